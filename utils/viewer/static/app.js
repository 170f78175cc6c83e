// The bone age viewer: posts a film to /predict and shows both estimates, the report, the heatmaps and the
// patient's course. Plain script, no build step, nothing from the internet. Files under /storage and the chart are
// fetched with the API key and shown through blob: URLs, since <img src> cannot send a header.
"use strict";

(() => {
  const KEY_STORAGE = "boneage.apiKey";  // sessionStorage only: the key is gone when the tab closes
  const NONE = "\u2014";
  const CLASSIFICATIONS = { delayed: "Delayed", normal: "Normal", advanced: "Advanced" };
  const ERROR_TITLES = {
    0: "No answer.", 401: "API key refused.", 404: "Not found.", 413: "File too large.",
    422: "Not accepted.", 503: "Service unavailable, try again shortly.",
  };
  const $ = (id) => document.getElementById(id);
  let objectUrls = [];
  let submission = 0;  // answers to an earlier submission are dropped

  class ApiError extends Error {
    constructor(message, status) {
      super(message);
      this.status = status;
    }
  }

  // ---------------------------------------------------------------------------------------------------------------
  // the API

  // A URL of this app: "/storage/..." from the API becomes relative to the page, so a proxy prefix is kept.
  const appUrl = (path) => new URL(String(path).replace(/^\/+/, ""), document.baseURI).href;

  function keyHeaders() {
    const key = $("api-key").value.trim();
    return key ? { "X-API-Key": key } : {};
  }

  async function detailOf(response) {
    let detail = null;
    try {
      detail = (await response.json()).detail;
    } catch {
      // not JSON (a proxy's error page): the status says it
    }
    if (typeof detail === "string" && detail.trim()) return detail.trim();
    if (Array.isArray(detail)) {
      const messages = detail.map((d) => (d && typeof d.msg === "string" ? d.msg : "")).filter(Boolean);
      if (messages.length) return messages.join("; ");
    }
    return `The service answered ${response.status} ${response.statusText}`.trim() + ".";
  }

  async function call(path, options = {}) {
    let response;
    try {
      response = await fetch(appUrl(path), { ...options, headers: keyHeaders(), cache: "no-store" });
    } catch {
      throw new ApiError("The service could not be reached. Is it running?", 0);
    }
    if (!response.ok) throw new ApiError(await detailOf(response), response.status);
    return response;
  }

  async function blobUrl(path) {
    const blob = await (await call(path)).blob();
    const url = URL.createObjectURL(blob);
    objectUrls.push(url);
    return url;
  }

  function forgetImages() {
    objectUrls.forEach((url) => URL.revokeObjectURL(url));
    objectUrls = [];
    document.querySelectorAll("#result img").forEach((img) => {
      img.removeAttribute("src");
      img.hidden = true;
    });
  }

  // ---------------------------------------------------------------------------------------------------------------
  // formatting

  const isNumber = (value) => typeof value === "number" && Number.isFinite(value);

  function yearsMonths(months) {
    const total = Math.round(Math.abs(months));
    return `${months < 0 && total > 0 ? "\u2212" : ""}${Math.floor(total / 12)} y ${total % 12} m`;
  }

  function age(months) {
    return isNumber(months) ? `${yearsMonths(months)} (${months.toFixed(1)} months)` : NONE;
  }

  const signOf = (months) => (months > 0 ? "+" : months < 0 ? "\u2212" : "");
  const signedYearsMonths = (months) => `${signOf(months)}${yearsMonths(Math.abs(months))}`;

  function signedAge(months) {
    if (!isNumber(months)) return NONE;
    return `${signedYearsMonths(months)} (${signOf(months)}${Math.abs(months).toFixed(1)} months)`;
  }

  // "low to high" in years and months, then in months.
  function range(low, high, signed = false) {
    if (!isNumber(low) || !isNumber(high)) return NONE;
    const words = signed ? signedYearsMonths : yearsMonths;
    const months = (m) => (signed ? signOf(m) : "") + Math.abs(m).toFixed(1);
    return `${words(low)} to ${words(high)} (${months(low)} to ${months(high)} months)`;
  }

  const signedNumber = (value) => (isNumber(value) ? `${value > 0 ? "+" : ""}${value.toFixed(2)}` : NONE);
  const classification = (value) => CLASSIFICATIONS[value] || "Not classified";

  function utc(timestamp) {
    const date = new Date(timestamp);
    if (Number.isNaN(date.getTime())) return String(timestamp || NONE);
    const iso = date.toISOString();
    return `${iso.slice(0, 10)} ${iso.slice(11, 16)}`;
  }

  // ---------------------------------------------------------------------------------------------------------------
  // showing a result

  function setText(id, text) {
    $(id).textContent = text;
  }

  function showEstimate(rowId, prediction, applies) {
    const row = $(rowId);
    const interval = prediction && prediction.interval_90;
    row.querySelector(".age").textContent = age(prediction && prediction.age_months);
    row.querySelector(".interval").textContent = interval ? range(interval.low_months, interval.high_months) : NONE;
    row.querySelector(".applies").textContent = applies ? "applies to this patient" : "";
    row.classList.toggle("applicable", applies);
  }

  function showEstimates(result) {
    const applicable = result.applicable_prediction;
    showEstimate("est-male", result.male_prediction, applicable === "male_prediction");
    showEstimate("est-female", result.female_prediction, applicable === "female_prediction");
    setText("applicable", applicable
      ? `The ${applicable === "male_prediction" ? "male" : "female"} model's estimate applies (sex ${result.sex}, `
        + `from the ${result.sex_source === "dicom" ? "DICOM" : "form"}).`
      : "Sex unknown: neither estimate is selected; both are shown.");
    $("fallback").hidden = !result.female_model_fallback;
  }

  function addField(list, term, value) {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = term;
    dd.textContent = value;
    list.append(dt, dd);
  }

  function showReport(report) {
    const fields = $("report-fields");
    fields.replaceChildren();
    const badge = $("report-classification");
    if (!report) {
      badge.textContent = "";
      badge.className = "badge";
      setText("report-note", "The service returned no report for this prediction.");
      setText("report-reference", "");
      return;
    }
    badge.textContent = classification(report.classification);
    badge.className = `badge ${report.classification || "none"}`;
    const source = { form: " (entered)", dicom: " (from the DICOM)" }[report.chronological_age_source] || "";
    addField(fields, "Chronological age", age(report.chronological_age_months) + (
      isNumber(report.chronological_age_months) ? source : ""));
    addField(fields, "Bone age", age(report.bone_age_months));
    const diff = report.difference_interval_90;
    addField(fields, "Bone age \u2212 chronological age", signedAge(report.difference_months));
    addField(fields, "Difference, 90% interval", diff ? range(diff.low_months, diff.high_months, true) : NONE);
    addField(fields, "SDS", signedNumber(report.sds));
    setText("report-note", report.note || "");
    const reference = report.reference;
    setText("report-reference", reference
      ? `Reference: ${[reference.name, reference.version].filter(Boolean).join(" ")}.`
        + (reference.citation ? ` ${reference.citation}` : "") : "");
  }

  function showResult(result) {
    setText("r-patient", result.patient_id);
    setText("r-meta", `Prediction ${result.prediction_id}, ${utc(result.timestamp)} UTC. `
      + `Models: ${result.male_prediction.model_version}, ${result.female_prediction.model_version}.`);
    setText("r-notice", result.notice || "Research model, not a medical device: not for clinical use.");
    showEstimates(result);
    showReport(result.report);
    $("result").hidden = false;
  }

  async function showImage(imgId, captionId, path, caption) {
    const img = $(imgId);
    setText(captionId, caption);
    if (!path) return;
    try {
      img.src = await blobUrl(path);
      await img.decode();
      img.hidden = false;
    } catch (error) {
      img.hidden = true;
      setText(captionId, `${caption}: could not be loaded (${error.message})`);
    }
  }

  // PNG and JPEG originals are shown as uploaded; a DICOM (or TIFF) is not viewable in a browser: its film is.
  function showOriginal(result) {
    const name = result.original_path || result.original_url || "";
    if (/\.(png|jpe?g)$/i.test(name)) return showImage("img-original", "cap-original", result.original_url, "Original");
    const kind = /\.dcm$/i.test(name) ? "DICOM" : "TIFF";
    if (result.film_url) {
      return showImage("img-original", "cap-original", result.film_url, `Film (the ${kind}'s pixels as shown)`);
    }
    setText("cap-original", `The original is a ${kind} file, which a browser cannot show.`);
    return Promise.resolve();
  }

  function courseRow(entry, current) {
    const row = document.createElement("tr");
    if (current) row.className = "current";
    const cells = [utc(entry.timestamp), age(entry.chronological_age_months), age(entry.bone_age_months),
                   signedAge(entry.difference_months), signedNumber(entry.sds),
                   entry.classification ? classification(entry.classification) : NONE];
    for (const text of cells) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    return row;
  }

  // The stored predictions, oldest first, when the service gives no `course` (bone age of the applicable model).
  function courseFromPredictions(predictions) {
    return [...(predictions || [])].reverse().map((p) => ({
      prediction_id: p.prediction_id, timestamp: p.timestamp,
      bone_age_months: p.applicable_prediction ? p[p.applicable_prediction].age_months : null,
    }));
  }

  async function showCourse(result, run) {
    const body = $("course").querySelector("tbody");
    body.replaceChildren();
    setText("course-note", "");
    const patient = encodeURIComponent(result.patient_id);
    const chart = showImage("chart", "cap-chart", `results/${patient}/chart.png`,
                            "Bone age against chronological age");
    try {
      const results = await (await call(`results/${patient}`)).json();
      if (run !== submission) return;
      const course = Array.isArray(results.course) ? results.course : courseFromPredictions(results.predictions);
      if (!Array.isArray(results.course)) {
        setText("course-note", "The service returned no course: stored predictions are listed without a report.");
      }
      for (const entry of course) body.append(courseRow(entry, entry.prediction_id === result.prediction_id));
    } catch (error) {
      setText("course-note", `The history could not be loaded: ${error.message}`);
    }
    await chart;
  }

  // ---------------------------------------------------------------------------------------------------------------
  // the form

  function showError(error) {
    const status = error instanceof ApiError ? error.status : 0;
    setText("error-title", ERROR_TITLES[status] || (status >= 500 ? "Service error." : "Refused."));
    setText("error-detail", error instanceof ApiError ? error.message : "Something went wrong in the page.");
    $("error").hidden = false;
  }

  function formData() {
    const data = new FormData();
    data.append("patient_id", $("patient-id").value.trim());
    data.append("sex", $("sex").value);
    const months = $("age").value.trim();
    if (months !== "") data.append("chronological_age_months", months);  // omitted when empty
    const film = $("film").files[0];
    data.append("image", film, film.name);
    return data;
  }

  async function submit(event) {
    event.preventDefault();
    const form = $("predict-form");
    if (!form.reportValidity()) return;
    const run = ++submission;
    $("error").hidden = true;
    $("result").hidden = true;
    forgetImages();
    $("submit").disabled = true;
    setText("status", "Estimating bone age\u2026");
    try {
      const result = await (await call("predict", { method: "POST", body: formData() })).json();
      if (run !== submission) return;
      showResult(result);
      setText("status", "Loading the images and the course\u2026");
      await Promise.all([
        showOriginal(result),
        showImage("img-male", "cap-male", result.male_prediction.gradcam_url, "Male model heatmap"),
        showImage("img-female", "cap-female", result.female_prediction.gradcam_url, "Female model heatmap"),
        showCourse(result, run),
      ]);
      if (run === submission) setText("status", "Done.");
    } catch (error) {
      if (run !== submission) return;
      setText("status", "");
      showError(error);
    } finally {
      if (run === submission) $("submit").disabled = false;
    }
  }

  function showAgeHint() {
    const months = Number.parseFloat($("age").value);
    $("age-hint").textContent = isNumber(months) && months >= 0
      ? `= ${yearsMonths(months)}` : "leave empty if unknown (a DICOM's own age is used when it has one)";
  }

  function rememberKey() {
    const key = $("api-key").value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  }

  function forgetKey() {
    $("api-key").value = "";
    sessionStorage.removeItem(KEY_STORAGE);
  }

  $("api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
  $("api-key").addEventListener("input", rememberKey);
  $("forget-key").addEventListener("click", forgetKey);
  $("age").addEventListener("input", showAgeHint);
  $("predict-form").addEventListener("submit", submit);
})();
