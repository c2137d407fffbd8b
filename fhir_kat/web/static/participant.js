/* A participant's page: who (Patient), the timeline of referral, intake steps, consents, KaT
   sessions (dose in mg and mg/kg, vital signs, adverse events), questionnaires and safety
   flags, and every instrument total over time in a chart with its bands and cut-off. Every
   record comes from the FHIR API with this session's permissions (ADR 0015). */
"use strict";
(function () {
  const about = document.getElementById("participant-about");
  const pid = about.dataset.patient;
  const instruments = JSON.parse(document.getElementById("instruments").textContent);
  const steps = JSON.parse(document.getElementById("intake-steps").textContent);
  const status = document.getElementById("participant-status");
  const summary = document.getElementById("error-summary");
  const ref = "Patient/" + encodeURIComponent(pid);
  const INTAKE_STEPS = ["nurse-intake", "psychiatrist-clearance", "contraindication-check"];
  const VITALS = { "85354-9": "Blood pressure", "8867-4": "Heart rate", "59408-5": "SpO2", "2708-6": "SpO2", "9279-1": "Respiratory rate", "29463-7": "Body weight" };

  function code(concept) { return (((concept || {}).coding || [])[0] || {}).code || ""; }

  function quantity(q) {
    if (!q) return "";
    const unit = q.unit && !q.unit.startsWith("{") ? " " + q.unit : "";
    return q.value + unit;
  }

  function observationText(o) {
    const c = code(o.code);
    if (INTAKE_STEPS.includes(c)) return "Intake: " + steps[c] + " — " + Kat.codingText(o.valueCodeableConcept);
    if (steps[c]) {
      // A fact the referral stated (kat-intake: prior treatment failure, …).
      const value = o.valueBoolean === true ? "yes" : o.valueBoolean === false ? "no" : Kat.codingText(o.valueCodeableConcept) || "recorded";
      return steps[c] + ": " + value;
    }
    if (c === "85354-9") {
      const part = (k) => ((o.component || []).find((x) => code(x.code) === k) || {}).valueQuantity;
      return "Blood pressure " + ((part("8480-6") || {}).value ?? "?") + "/" + ((part("8462-4") || {}).value ?? "?") + " mm[Hg]";
    }
    if (VITALS[c]) return VITALS[c] + " " + quantity(o.valueQuantity);
    const inst = instruments.find((i) => i.total_code === c);
    if (inst) {
      const band = (o.interpretation || []).map(Kat.codingText).filter(Boolean).join(", ");
      return inst.title + " total " + quantity(o.valueQuantity) + (band ? " (" + band + ")" : "");
    }
    return null; // item answers and findings: shown with their questionnaire, not one by one
  }

  function doseText(m, weights) {
    const dose = (m.dosage || {}).dose;
    const route = Kat.codingText((m.dosage || {}).route);
    const weightRef = ((m.supportingInformation || [])[0] || {}).reference || "";
    const weight = weights.get(weightRef);
    let perKg = "";
    if (dose && weight && weight.unit === "kg" && weight.value > 0) perKg = " (" + (Math.round(dose.value / weight.value * 100) / 100) + " mg/kg at " + weight.value + " kg)";
    return "KaT " + ((m.dosage || {}).text || "session") + ": ketamine " + (dose ? dose.value + " " + (dose.unit || "mg") : "dose not recorded") + perKg + (route ? ", " + route : "");
  }

  function item(when, kind, text, anchor) {
    return { when: when || "", kind, text, anchor };
  }

  async function all(url) {
    return (await Kat.searchAll(url, 10)).map((e) => e.resource);
  }

  async function load() {
    try {
      const patient = await Kat.api("GET", "/fhir/" + ref);
      const name = Kat.patientName(patient) || "Participant";
      document.getElementById("participant-name").textContent = name;
      document.title = name + " · fhir_kat";
      document.getElementById("participant-phn").textContent = Kat.patientPhn(patient) || "—";
      document.getElementById("participant-born").textContent = patient.birthDate || "—";
      about.hidden = false;
      const q = "patient=" + ref + "&_count=200";
      const [tasks, consents, observations, doses, events, responses, flags] = await Promise.all([
        all("/fhir/Task?" + q), all("/fhir/Consent?" + q), all("/fhir/Observation?" + q),
        all("/fhir/MedicationAdministration?" + q), all("/fhir/AdverseEvent?subject=" + ref + "&_count=200"),
        all("/fhir/QuestionnaireResponse?" + q), all("/fhir/Flag?" + q),
      ]);
      const weights = new Map(observations.filter((o) => code(o.code) === "29463-7").map((o) => ["Observation/" + o.id, o.valueQuantity || {}]));
      const items = [];
      for (const t of tasks) {
        items.push(item(t.authoredOn, "Referral", "Referral received" + ((t.identifier || [])[0] ? " (" + t.identifier[0].value + ")" : "") + ": now " + Kat.codingText(t.businessStatus) + (t.statusReason ? " — " + Kat.codingText(t.statusReason) : ""), "Task-" + t.id));
      }
      for (const c of consents) {
        const kind = (c.category || []).map(Kat.codingText).filter(Boolean)[0] || Kat.codingText(c.scope) || "Consent";
        items.push(item(c.dateTime, "Consent", kind + " (" + c.status + ")", "Consent-" + c.id));
      }
      for (const o of observations) {
        const text = observationText(o);
        const kind = INTAKE_STEPS.includes(code(o.code)) ? "Intake" : steps[code(o.code)] ? "Referral" : "Measurement";
        if (text) items.push(item(o.effectiveDateTime || (o.effectivePeriod || {}).start || o.issued, kind, text, "Observation-" + o.id));
      }
      for (const m of doses) items.push(item((m.effectivePeriod || {}).start || m.effectiveDateTime, "KaT session", doseText(m, weights), "MedicationAdministration-" + m.id));
      for (const e of events) {
        items.push(item(e.date, "Adverse event", Kat.codingText(e.event) + (e.seriousness ? " — " + Kat.codingText(e.seriousness) : ""), "AdverseEvent-" + e.id));
      }
      for (const r of responses) {
        const title = (r.questionnaire || "").split("/").pop().split("|")[0].toUpperCase();
        items.push(item(r.authored, "Questionnaire", title + " answered", "QuestionnaireResponse-" + r.id));
      }
      for (const f of flags) {
        items.push(item((f.period || {}).start, "Safety flag", ((f.code || {}).text || Kat.codingText(f.code)) + (f.status === "active" ? " (open)" : " (resolved)"), "Flag-" + f.id));
      }
      items.sort((a, b) => String(a.when).localeCompare(String(b.when)));
      const list = document.getElementById("timeline");
      list.replaceChildren(...items.map((i) => {
        const li = Kat.el("li", null, { id: i.anchor });
        li.append(Kat.el("span", Kat.when(i.when), { class: "when" }), " ", Kat.el("strong", i.kind + ": "), i.text);
        return li;
      }));
      if (!items.length) list.replaceChildren(Kat.el("li", "Nothing recorded yet."));
      charts(observations);
      status.textContent = items.length + " records.";
      if (location.hash) { const target = document.getElementById(location.hash.slice(1)); if (target) { target.classList.add("target"); target.scrollIntoView(); } }
    } catch (e) {
      status.textContent = "";
      Kat.showErrors(summary, e.messages || [{ text: String(e) }], "The participant could not be loaded");
    }
    document.body.dataset.loaded = "true";
  }

  function charts(observations) {
    const holder = document.getElementById("score-charts");
    const figures = [];
    for (const inst of instruments) {
      const points = observations.filter((o) => code(o.code) === inst.total_code && o.valueQuantity)
        .map((o) => ({ when: new Date(o.effectiveDateTime), value: o.valueQuantity.value, label: Kat.when(o.effectiveDateTime) }))
        .filter((p) => !Number.isNaN(p.when.getTime()))
        .sort((a, b) => a.when - b.when);
      if (!points.length) continue;
      const fig = Kat.el("figure", null, { class: "chart", "data-instrument": inst.key });
      fig.append(KatChart.timeSeries("chart-" + inst.key, inst, points));
      fig.append(Kat.el("figcaption", inst.title + ": " + points.length + " score" + (points.length === 1 ? "" : "s") + "; cut-off " + inst.positive_at + " " + inst.unit + "."));
      figures.push(fig);
    }
    holder.replaceChildren(...(figures.length ? figures : [Kat.el("p", "No scores yet.")]));
  }

  load();
})();
