"""What a clinician reads: the report of a prediction against the child's chronological age (`clinical`), the
reference it compares with (`reference`, a published table kept as data) and a patient's chart over visits
(`chart`)."""
