/* An instrument Questionnaire as a form: builds a standard QuestionnaireResponse, posts it to
   /fhir/QuestionnaireResponse, then shows the total score the service extracted from it. */
"use strict";
(function () {
  const form = document.getElementById("questionnaire-form");
  const summary = document.getElementById("error-summary");
  const result = document.getElementById("result");
  const totalCodes = (form.dataset.totalCodes || "").split(" ").filter(Boolean);
  const words = JSON.parse(document.getElementById("safety-words").textContent);
  const alertBox = document.getElementById("safety-alert");
  const patientInput = document.getElementById("patient");
  const chosenText = document.getElementById("participant-chosen");
  const results = document.getElementById("participant-results");
  const searchBox = document.getElementById("participant-search");
  const DETAIL = "http://hl7.org/fhir/StructureDefinition/flag-detail";
  const CATEGORY = "http://terminology.hl7.org/CodeSystem/flag-category|safety";

  function describe(p) {
    const phn = Kat.patientPhn(p);
    return (Kat.patientName(p) || "Name not recorded") + (phn ? ", PHN " + phn : "") + (p.birthDate ? ", born " + p.birthDate : "");
  }

  function choose(p) {
    patientInput.value = p.id;
    patientInput.defaultValue = p.id;
    chosenText.textContent = "Answers are for: " + describe(p) + ".";
    document.getElementById("patient-error").hidden = true;
  }

  /* Participants as the API finds them for this session: by PHN (10 digits) or by name. */
  async function find() {
    const text = searchBox.value.trim();
    if (!text) return;
    const query = /^\d{10}$/.test(text)
      ? "identifier=" + encodeURIComponent(Kat.PHN_SYSTEMS.map((s) => s + "|" + text).join(","))
      : "name=" + encodeURIComponent(text);
    try {
      const bundle = await Kat.api("GET", "/fhir/Patient?" + query + "&_count=20");
      const found = (bundle.entry || []).map((e) => e.resource);
      const group = Kat.el("fieldset", null, { class: "results" });
      group.append(Kat.el("legend", found.length ? "Choose the participant (" + found.length + " found)" : "No participant found"));
      for (const p of found) {
        const label = Kat.el("label", null, { class: "choice" });
        const radio = Kat.el("input", null, { type: "radio", name: "participant-choice", value: p.id });
        radio.addEventListener("change", () => choose(p));
        label.append(radio, " " + describe(p));
        group.append(label);
      }
      results.replaceChildren(group);
      if (found.length === 1) { group.querySelector("input").checked = true; choose(found[0]); }
    } catch (e) {
      Kat.showErrors(summary, e.messages || [{ text: String(e) }], "The participant search failed");
    }
  }

  document.getElementById("participant-find").addEventListener("click", find);
  searchBox.addEventListener("keydown", (ev) => { if (ev.key === "Enter") { ev.preventDefault(); find(); } });
  if (patientInput.value) {
    Kat.api("GET", "/fhir/Patient/" + encodeURIComponent(patientInput.value)).then(choose).catch(() => {
      chosenText.textContent = "";
      patientInput.value = "";
      patientInput.defaultValue = "";
    });
  }

  /* The safety Flags this response raised, said on the spot in words a nurse acts on. */
  async function raisedBy(qrId, patientId) {
    const bundle = await Kat.api("GET", "/fhir/Flag?patient=" + encodeURIComponent(patientId) + "&status=active&category=" + encodeURIComponent(CATEGORY) + "&_count=100");
    const target = "QuestionnaireResponse/" + qrId;
    return (bundle.entry || []).map((e) => e.resource).filter((f) => (f.extension || []).some((x) => x.url === DETAIL && (x.valueReference || {}).reference === target));
  }

  function showAlert(flags) {
    if (!flags.length) { alertBox.hidden = true; alertBox.replaceChildren(); return; }
    alertBox.replaceChildren(Kat.el("h2", flags.length === 1 ? "Safety flag raised" : flags.length + " safety flags raised"));
    for (const f of flags) {
      const code = (((f.code || {}).coding || [])[0] || {}).code || "";
      // The Flag's own priority (extension flag-priority, from the safety rules).
      const ext = (f.extension || []).find((x) => x.url === "http://hl7.org/fhir/StructureDefinition/flag-priority");
      const coding = (((ext || {}).valueCodeableConcept || {}).coding || [])[0] || {};
      const label = (words.priority.codes[coding.code] || words.priority.unknown).label;
      const p = Kat.el("p");
      p.append(Kat.el("strong", label + ": "), (words.act[code] || words.default));
      alertBox.append(p);
    }
    const more = Kat.el("p");
    more.append("The flag is in the ", Kat.el("a", "safety inbox", { href: "/app/safety" }), ", where it is acknowledged and resolved.");
    alertBox.append(more);
    alertBox.hidden = false;
    alertBox.focus();
  }

  function problems() {
    const out = [];
    const pError = document.getElementById("patient-error");
    const pBad = !patientInput.value.trim();
    pError.textContent = pBad ? "Find and choose the participant." : "";
    pError.hidden = !pBad;
    if (pBad) out.push({ text: "Participant: find and choose the participant by name or PHN.", field: searchBox });
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
    showAlert([]);
    const found = problems();
    if (found.length) { Kat.showErrors(summary, found, "Please complete the form: " + found.length + (found.length === 1 ? " answer is" : " answers are") + " missing"); return; }
    const button = document.getElementById("submit-questionnaire");
    button.disabled = true;
    result.textContent = "Saving…";
    try {
      const stored = await Kat.api("POST", "/fhir/QuestionnaireResponse", response());
      const obs = await Kat.api("GET", "/fhir/Observation?derived-from=" + encodeURIComponent("QuestionnaireResponse/" + stored.id) + "&_count=100");
      const total = (obs.entry || []).map((e) => e.resource).find((o) => ((o.code || {}).coding || []).some((c) => totalCodes.includes(c.code)));
      result.replaceChildren(Kat.el("p", "Answers saved for " + chosenText.textContent.replace(/^Answers are for: /, "").replace(/\.$/, "") + ".", { id: "saved-as", "data-id": stored.id }));
      if (total) {
        const value = total.valueQuantity ? total.valueQuantity.value : total.valueInteger;
        const unit = total.valueQuantity && total.valueQuantity.unit && !total.valueQuantity.unit.startsWith("{") ? " " + total.valueQuantity.unit : "";
        const band = (total.interpretation || []).map(Kat.codingText).filter(Boolean).join(", ");
        result.append(Kat.el("p", "Total score: " + value + unit + (band ? " (" + band + ")" : ""), { id: "total-score", "data-value": String(value) }));
      } else {
        result.append(Kat.el("p", "No total score: not every scored question was answered."));
      }
      form.reset();
      showAlert(await raisedBy(stored.id, patientInput.value));
      if (alertBox.hidden) result.scrollIntoView({ block: "center" });
    } catch (e) {
      result.textContent = "";
      Kat.showErrors(summary, e.messages || [{ text: String(e) }], "The answers were not saved");
    } finally {
      button.disabled = false;
    }
  });
})();
