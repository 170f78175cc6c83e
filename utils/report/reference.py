"""The reference of bone age by chronological age and sex that the report compares against.

Greulich & Pyle's atlas standards rest on the Brush Foundation Study (Cleveland, children born 1917-1942): for
each sex and chronological age, the mean skeletal age and its standard deviation, both in months. The table
`brush_foundation_1959.csv` holds those values as reproduced in Gaskin CM, Kahn SL, Bertozzi JC, Bunch PM.
Skeletal Development of the Hand and Wrist: A Radiographic Atlas and Digital Bone Age Companion. Oxford
University Press, 2011, Tables 1 (boys, 3 months to 17 years) and 2 (girls, 3 months to 16 years).

Convention: between two tabulated ages the mean and SD are interpolated linearly in chronological age;
SDS = (bone age - reference mean at the child's age) / reference SD at that age; outside the tabulated ages there
is no SDS.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TABLE = Path(__file__).with_name("brush_foundation_1959.csv")
NAME = "Greulich & Pyle / Brush Foundation Study: skeletal age by chronological age and sex"
VERSION = "brush-foundation-1959 (Gaskin et al. 2011, Tables 1-2)"
CITATION = ("Greulich WW, Pyle SI. Radiographic Atlas of Skeletal Development of the Hand and Wrist, 2nd ed. "
            "Stanford University Press, 1959; means and SDs as reproduced in Gaskin CM et al. Skeletal Development "
            "of the Hand and Wrist: A Radiographic Atlas and Digital Bone Age Companion. Oxford University Press, "
            "2011, Tables 1-2.")


@dataclass(frozen=True)
class ReferenceCurve:
    """One sex's table: chronological ages with the mean bone age and SD at each (months)."""

    ages: np.ndarray
    means: np.ndarray
    sd: np.ndarray

    @property
    def age_range(self) -> tuple[float, float]:
        return float(self.ages[0]), float(self.ages[-1])

    def covers(self, age_months: float) -> bool:
        low, high = self.age_range
        return low <= age_months <= high

    def mean_and_sd(self, age_months: float) -> tuple[float, float]:
        """The reference mean bone age and SD at `age_months`, interpolated linearly (inside the range only)."""
        if not self.covers(age_months):
            raise ValueError(f"age {age_months} months is outside the reference's {self.age_range}")
        return (float(np.interp(age_months, self.ages, self.means)),
                float(np.interp(age_months, self.ages, self.sd)))

    def sds(self, age_months: float, bone_age_months: float) -> float:
        mean, sd = self.mean_and_sd(age_months)
        return (bone_age_months - mean) / sd


def load_reference(path: Path = TABLE) -> dict[str, ReferenceCurve]:
    """{"male": curve, "female": curve} from the CSV (columns sex, chronological_age_months, mean, sd)."""
    rows: dict[str, list[tuple[float, float, float]]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            rows.setdefault(row["sex"], []).append((float(row["chronological_age_months"]),
                                                    float(row["mean_bone_age_months"]), float(row["sd_months"])))
    curves = {}
    for sex, values in rows.items():
        table = np.array(sorted(values))
        curves[sex] = ReferenceCurve(table[:, 0], table[:, 1], table[:, 2])
    return curves
