/* An instrument Questionnaire as a form: builds a standard QuestionnaireResponse, posts it to
   /fhir/QuestionnaireResponse, then shows the total score the service extracted from it. */
"use strict";
(function () {
  const form = document.getElementById("questionnaire-form");
  const summary = document.getElementById("error-summary");
  const result = document.getElementById("result");
  const totalCodes = (form.dataset.totalCodes || "").split(" ").filter(Boolean);

  function problems() {
    const out = [];
    const patient = document.getElementById("patient");
    const pError = document.getElementById("patient-error");
    const pBad = !/^[A-Za-z0-9\-.]{1,64}$/.test(patient.value.trim());
    pError.textContent = pBad ? "Enter the participant's Patient id." : "";
    pError.hidden = !pBad;
    patient.setAttribute("aria-invalid", pBad ? "true" : "false");
    if (pBad) out.push({ text: "Participant: enter the participant's Patient id.", field: patient });
    for (const q of form.querySelectorAll("fieldset.question")) {
      const missing = q.dataset.required === "true" && !q.querySelector("input:checked");
      const error = document.getElementById(q.id + "-error");
      error.textContent = missing ? "Choose an answer." : "";
      error.hidden = !missing;
      q.setAttribute("aria-invalid", missing ? "true" : "false");
      if (missing) out.push({ text: q.querySelector("legend").textContent.replace("*", "").trim() + ": choose an answer.", field: q });
    }
    return out;
  }

  function response() {
    const items = [];
    for (const q of form.querySelectorAll("fieldset.question")) {
      const chosen = q.querySelector("input:checked");
      if (!chosen) continue;
      items.push({
        linkId: q.dataset.linkId, text: q.dataset.text,
        answer: [{ valueCoding: { system: chosen.dataset.system, code: chosen.dataset.code, display: chosen.dataset.display } }],
      });
    }
    return {
      resourceType: "QuestionnaireResponse",
      questionnaire: form.dataset.url + (form.dataset.version ? "|" + form.dataset.version : ""),
      status: "completed",
      subject: { reference: "Patient/" + document.getElementById("patient").value.trim() },
      authored: Kat.nowWithOffset(),
      item: items,
    };
  }

  form.addEventListener("change", (ev) => {
    const q = ev.target.closest("fieldset.question");
    if (q) { const e = document.getElementById(q.id + "-error"); e.hidden = true; q.setAttribute("aria-invalid", "false"); }
  });

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    Kat.clearErrors(summary);
    result.textContent = "";
    const found = problems();
    if (found.length) { Kat.showErrors(summary, found, "Please complete the form: " + found.length + (found.length === 1 ? " answer is" : " answers are") + " missing"); return; }
    const button = document.getElementById("submit-questionnaire");
    button.disabled = true;
    result.textContent = "Saving…";
    try {
      const stored = await Kat.api("POST", "/fhir/QuestionnaireResponse", response());
      const obs = await Kat.api("GET", "/fhir/Observation?derived-from=" + encodeURIComponent("QuestionnaireResponse/" + stored.id) + "&_count=100");
      const total = (obs.entry || []).map((e) => e.resource).find((o) => ((o.code || {}).coding || []).some((c) => totalCodes.includes(c.code)));
      result.replaceChildren(Kat.el("p", "Saved as QuestionnaireResponse/" + stored.id + ".", { id: "saved-as", "data-id": stored.id }));
      if (total) {
        const value = total.valueQuantity ? total.valueQuantity.value : total.valueInteger;
        const unit = total.valueQuantity && total.valueQuantity.unit && !total.valueQuantity.unit.startsWith("{") ? " " + total.valueQuantity.unit : "";
        const band = (total.interpretation || []).map(Kat.codingText).filter(Boolean).join(", ");
        result.append(Kat.el("p", "Total score: " + value + unit + (band ? " (" + band + ")" : ""), { id: "total-score", "data-value": String(value) }));
      } else {
        result.append(Kat.el("p", "No total score: not every scored question was answered."));
      }
      form.reset();
      result.scrollIntoView({ block: "center" });
    } catch (e) {
      result.textContent = "";
      Kat.showErrors(summary, e.messages || [{ text: String(e) }], "The answers were not saved");
    } finally {
      button.disabled = false;
    }
  });
})();
