/* The program team's worklist: new referrals, holds needing review (the reason, and the intake
   step that clears each), intake steps due, the KaT sessions booked from today on (FHIR
   Appointments: date and time, session number), and the participants in the program with
   their sessions given — accepted ones without a booking say so. Each row names the patient.
   Every record comes from the FHIR API with this session's permissions (ADR 0015). */
"use strict";
(function () {
  const steps = JSON.parse(document.getElementById("intake-steps").textContent);
  const STEP_ORDER = ["nurse-intake", "psychiatrist-clearance", "contraindication-check"];
  const status = document.getElementById("worklist-status");
  const summary = document.getElementById("error-summary");
  const TASK_CODE = "http://hl7.org/fhir/CodeSystem/task-code|fulfill";
  const BASE = JSON.parse(document.getElementById("canonical-base").textContent);
  const INTAKE = BASE + "/CodeSystem/kat-intake";
  // kat-service#kat-session (the program's CodeSystem): a KaT treatment session booking.
  const SESSION = BASE + "/CodeSystem/kat-service|kat-session";
  const SESSION_NUMBER = BASE + "/StructureDefinition/session-number";

  function code(concept) { return (((concept || {}).coding || [])[0] || {}).code || ""; }

  function patientCell(task, patients) {
    const pref = (task.for || {}).reference || "";
    const patient = patients.get(pref);
    const th = Kat.el("th", null, { scope: "row" });
    const phn = patient ? Kat.patientPhn(patient) : "";
    const text = patient ? (Kat.patientName(patient) || "Name not recorded") + (phn ? " (PHN " + phn + ")" : "") : "Participant";
    th.append(Kat.el("a", text, { href: "/app/participants/" + encodeURIComponent(pref.split("/")[1] || "") }));
    return th;
  }

  function patientOf(appointment) {
    return (appointment.participant || []).map((p) => (p.actor || {}).reference || "").find((r) => r.startsWith("Patient/")) || "";
  }

  function sessionNumber(appointment) {
    const ext = (appointment.extension || []).find((x) => x.url === SESSION_NUMBER);
    return ext && Number.isInteger(ext.valueInteger) ? "Session " + ext.valueInteger : "Session number not recorded";
  }

  function referralCell(task) {
    const td = Kat.el("td");
    const number = ((task.identifier || [])[0] || {}).value || Kat.when(task.authoredOn);
    td.append(Kat.el("a", number, { href: "/app/referrals/" + encodeURIComponent(task.id) }));
    return td;
  }

  function fill(key, rows, width) {
    const body = document.querySelector("#work-" + key + " tbody");
    if (!rows.length) {
      const tr = document.createElement("tr");
      tr.append(Kat.el("td", "Nothing here.", { colspan: String(width) }));
      rows = [tr];
    }
    body.replaceChildren(...rows);
  }

  /* "… [cleared by contraindication-check]" (docs/referrals.md): the step's name instead. */
  function clearedBy(reason) {
    const found = [...reason.matchAll(/\[cleared by ([a-z, -]+)\]/g)].flatMap((m) => m[1].split(/,\s*|\s+or\s+/));
    return [...new Set(found)].map((s) => steps[s] || s).join("; ") || "A program clinician";
  }

  async function load() {
    try {
      const entries = await Kat.searchAll("/fhir/Task?code=" + encodeURIComponent(TASK_CODE) + "&status=requested,received,on-hold,accepted,in-progress&_include=Task:patient&_count=100", 20);
      const { patients, matches: tasks } = Kat.split(entries, "Task");
      tasks.sort((a, b) => String(a.authoredOn || "").localeCompare(String(b.authoredOn || "")));
      const stepObs = (await Kat.searchAll("/fhir/Observation?code=" + encodeURIComponent(STEP_ORDER.map((s) => INTAKE + "|" + s).join(",")) + "&_count=200", 20)).map((e) => e.resource);
      const cleared = new Map();
      for (const o of stepObs) {
        if (code(o.valueCodeableConcept) !== "cleared") continue;
        for (const f of o.focus || []) {
          if (!cleared.has(f.reference)) cleared.set(f.reference, new Set());
          cleared.get(f.reference).add(code(o.code));
        }
      }
      const doses = (await Kat.searchAll("/fhir/MedicationAdministration?_count=200", 20)).map((e) => e.resource);
      const given = new Map();
      for (const m of doses) { const p = (m.subject || {}).reference; given.set(p, (given.get(p) || 0) + 1); }

      const today = new Date().toISOString().slice(0, 10);
      const bookedEntries = await Kat.searchAll("/fhir/Appointment?status=booked&service-type=" + encodeURIComponent(SESSION) + "&date=ge" + today + "&_include=Appointment:patient&_count=100", 20);
      const { patients: booked, matches: appointments } = Kat.split(bookedEntries, "Appointment");
      appointments.sort((a, b) => String(a.start || "").localeCompare(String(b.start || "")));
      const hasBooking = new Set(appointments.map(patientOf));
      const taskOf = new Map(tasks.map((t) => [(t.for || {}).reference || "", t]));

      const rows = { new: [], holds: [], intake: [], scheduled: [], sessions: [] };
      for (const a of appointments) {
        const pref = patientOf(a);
        const tr = document.createElement("tr");
        tr.dataset.appointment = a.id;
        tr.append(patientCell({ for: { reference: pref } }, booked), Kat.el("td", Kat.when(a.start)), Kat.el("td", sessionNumber(a)));
        const task = taskOf.get(pref);
        tr.append(task ? referralCell(task) : Kat.el("td", "—"));
        rows.scheduled.push(tr);
      }
      for (const t of tasks) {
        const tr = document.createElement("tr");
        tr.dataset.task = t.id;
        tr.append(patientCell(t, patients), referralCell(t));
        const biz = code(t.businessStatus);
        if (t.status === "on-hold") {
          const reason = Kat.codingText(t.statusReason) || "No reason recorded";
          tr.append(Kat.el("td", reason.replace(/\s*\[cleared by [^\]]+\]/g, "")), Kat.el("td", clearedBy(reason)));
          rows.holds.push(tr);
        } else if (t.status === "requested" || (t.status === "received" && (biz === "received" || biz === "eligible"))) {
          tr.append(Kat.el("td", Kat.when(t.authoredOn)), Kat.el("td", Kat.codingText(t.businessStatus)));
          rows.new.push(tr);
        } else if (t.status === "received") {
          const done = cleared.get("Task/" + t.id) || new Set();
          const due = STEP_ORDER.filter((s) => !done.has(s));
          tr.append(Kat.el("td", [...done].map((s) => steps[s] || s).join("; ") || "—"), Kat.el("td", due.map((s) => steps[s] || s).join("; ") || "—"));
          rows.intake.push(tr);
        } else {
          const pref = (t.for || {}).reference || "";
          const stage = t.status !== "accepted" ? "Participating" : hasBooking.has(pref) ? "Accepted: first KaT session booked" : "Accepted: first KaT session to book";
          tr.append(Kat.el("td", stage), Kat.el("td", String(given.get((t.for || {}).reference) || 0)));
          rows.sessions.push(tr);
        }
      }
      fill("new", rows.new, 4); fill("holds", rows.holds, 4); fill("intake", rows.intake, 4); fill("scheduled", rows.scheduled, 4); fill("sessions", rows.sessions, 4);
      status.textContent = tasks.length + " open referrals.";
    } catch (e) {
      status.textContent = "";
      Kat.showErrors(summary, e.messages || [{ text: String(e) }], "The worklist could not be loaded");
    }
    document.body.dataset.loaded = "true";
  }

  load();
})();
