/* The safety inbox: the open safety Flags this session may see (GET /fhir/Flag, ADR 0015), by
   the priority each Flag carries (extension flag-priority, given by the safety rules,
   mappings/program/safety.yaml; a Flag without one first) then age, each naming the participant and what triggered
   it; acknowledge or resolve with a note (POST /api/v1/flags/<id>/$acknowledge | $resolve). */
"use strict";
(function () {
  const priority = JSON.parse(document.getElementById("priority").textContent);
  const PRIORITY = "http://hl7.org/fhir/StructureDefinition/flag-priority";
  const PRIORITY_SYSTEM = "http://hl7.org/fhir/flag-priority-code";
  const status = document.getElementById("inbox-status");
  const summary = document.getElementById("error-summary");
  const inbox = document.getElementById("inbox");
  const actor = document.getElementById("actor");
  const CATEGORY = "http://terminology.hl7.org/CodeSystem/flag-category|safety";
  const DETAIL = "http://hl7.org/fhir/StructureDefinition/flag-detail";
  const EXT = JSON.parse(document.getElementById("canonical-base").textContent) + "/StructureDefinition/";
  const TRIGGER = {
    QuestionnaireResponse: "Questionnaire answers", Observation: "Measurement", AdverseEvent: "Adverse event",
    MedicationAdministration: "Ketamine dose", Task: "Referral", Encounter: "KaT session", Consent: "Consent",
  };

  /* The Flag's own priority: its words, and its text (which says when the priority is a
     program decision awaiting clinical review). */
  function tier(flag) {
    const ext = (flag.extension || []).find((x) => x.url === PRIORITY);
    const concept = (ext || {}).valueCodeableConcept || {};
    const coding = (concept.coding || []).find((c) => c.system === PRIORITY_SYSTEM) || {};
    const words = priority.codes[coding.code] || priority.unknown;
    return { key: words.key, label: words.label, rank: Number(words.rank), text: concept.text || "" };
  }

  function by() {
    if (actor.dataset.known === "yes") {
      const given = actor.dataset.given ? actor.dataset.given.split(/\s+/) : [];
      return { family_name: actor.dataset.family, given_names: given, identifier: { system: actor.dataset.system, value: actor.dataset.value } };
    }
    const family = document.getElementById("actor-family").value.trim();
    const number = document.getElementById("actor-number").value.trim();
    const given = document.getElementById("actor-given").value.trim();
    if (!family || !number) return null;
    return { family_name: family, given_names: given ? given.split(/\s+/) : [], identifier: { system: actor.dataset.system, value: number } };
  }

  function acknowledgement(flag) {
    const ext = (flag.extension || []).find((x) => x.url === EXT + "flag-acknowledgement");
    if (!ext) return "";
    const at = (ext.extension || []).find((x) => x.url === "at");
    const note = (ext.extension || []).find((x) => x.url === "note");
    return "Acknowledged " + Kat.when(at ? at.valueDateTime : "") + (note ? ": " + note.valueString : "");
  }

  function card(flag, patient) {
    const t = tier(flag);
    const art = Kat.el("article", null, { class: "flag-card urgency-" + t.key, "aria-labelledby": "flag-" + flag.id + "-title", "data-flag": flag.id });
    art.append(Kat.el("p", t.label, { class: "urgency" }));
    if (t.text) art.append(Kat.el("p", "Priority: " + t.text, { class: "hint priority" }));
    const name = patient ? (Kat.patientName(patient) || "Participant") : "Participant";
    const phn = patient ? Kat.patientPhn(patient) : "";
    const h = Kat.el("h2", null, { id: "flag-" + flag.id + "-title" });
    const pid = ((flag.subject || {}).reference || "").split("/")[1] || "";
    h.append(Kat.el("a", name + (phn ? " (PHN " + phn + ")" : ""), { href: "/app/participants/" + encodeURIComponent(pid) }));
    art.append(h);
    art.append(Kat.el("p", (flag.code || {}).text || Kat.codingText(flag.code), { class: "what" }));
    const dl = Kat.el("dl");
    dl.append(Kat.el("dt", "When"), Kat.el("dd", Kat.when((flag.period || {}).start)));
    const detail = (flag.extension || []).filter((x) => x.url === DETAIL).map((x) => (x.valueReference || {}).reference || "");
    if (detail[0]) {
      const kind = detail[0].split("/")[0];
      const dd = Kat.el("dd");
      dd.append(Kat.el("a", TRIGGER[kind] || "Record", { href: "/app/participants/" + encodeURIComponent(pid) + "#" + detail[0].replace("/", "-") }));
      dl.append(Kat.el("dt", "Triggered by"), dd);
    }
    const ack = acknowledgement(flag);
    if (ack) dl.append(Kat.el("dt", "Taken on"), Kat.el("dd", ack));
    art.append(dl);
    const form = Kat.el("form", null, { class: "flag-action", novalidate: "" });
    const noteId = "note-" + flag.id;
    const field = Kat.el("div", null, { class: "field" });
    field.append(Kat.el("label", "Note", { for: noteId }), Kat.el("textarea", null, { id: noteId, rows: "2", maxlength: "2000" }));
    form.append(field);
    const buttons = Kat.el("div", null, { class: "buttons" });
    if (!ack) buttons.append(Kat.el("button", "Acknowledge", { type: "submit", value: "acknowledge" }));
    buttons.append(Kat.el("button", "Resolve", { type: "submit", value: "resolve" }));
    form.append(buttons);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const action = (ev.submitter || {}).value || "acknowledge";
      const who = by();
      if (!who) {
        Kat.showErrors(summary, [{ text: "Enter your family name and staff number before acting on a flag.", field: document.getElementById("actor-family") }]);
        return;
      }
      const note = document.getElementById(noteId).value.trim();
      try {
        await Kat.api("POST", "/api/v1/flags/" + encodeURIComponent(flag.id) + "/$" + action, note ? { by: who, note } : { by: who });
        Kat.clearErrors(summary);
        status.textContent = (action === "resolve" ? "Resolved: " : "Acknowledged: ") + name + ", " + ((flag.code || {}).text || "flag") + ".";
        await load(true);
      } catch (e) {
        Kat.showErrors(summary, e.messages || [{ text: String(e) }], "The flag was not updated");
      }
    });
    art.append(form);
    return art;
  }

  async function load(keepStatus) {
    try {
      const entries = await Kat.searchAll("/fhir/Flag?status=active&category=" + encodeURIComponent(CATEGORY) + "&_include=Flag:patient&_count=100", 20);
      const { patients, matches: flags } = Kat.split(entries, "Flag");
      flags.sort((a, b) => (tier(a).rank - tier(b).rank) || String((a.period || {}).start || "").localeCompare(String((b.period || {}).start || "")));
      inbox.replaceChildren(...flags.map((f) => card(f, patients.get((f.subject || {}).reference || ""))));
      if (!flags.length) inbox.replaceChildren(Kat.el("p", "No open safety flags."));
      if (!keepStatus) status.textContent = flags.length + (flags.length === 1 ? " open flag." : " open flags.");
    } catch (e) {
      Kat.showErrors(summary, e.messages || [{ text: String(e) }], "The safety inbox could not be loaded");
    }
    document.body.dataset.loaded = "true";
  }

  load(false);
})();
