/* A referral Task in words for the referring physician: its status and what happens next
   (the sentences come from the page: fhir_kat/web/wording.py). */
"use strict";
window.KatReferral = (function () {
  const wording = JSON.parse(document.getElementById("wording").textContent);
  const STATUS_TEXT = {
    draft: "Draft", requested: "Sent to the program", received: "Received by the program (intake under way)",
    accepted: "Accepted for KaT sessions", rejected: "Not accepted", ready: "Ready", cancelled: "Cancelled",
    "in-progress": "In progress", "on-hold": "On hold (clinician review)", failed: "Failed",
    completed: "Completed", "entered-in-error": "Entered in error",
  };

  function businessCode(task) {
    return (((task.businessStatus || {}).coding || [])[0] || {}).code || "";
  }

  function statusText(task) { return STATUS_TEXT[task.status] || task.status || ""; }

  function next(task) {
    return wording.status[task.status] || wording.next[businessCode(task)] || "The program will update this page as the referral moves on.";
  }

  function number(task) {
    const id = (task.identifier || [])[0];
    return id && id.value ? id.value : "";
  }

  return { STATUS_TEXT, statusText, next, number, businessCode };
})();
