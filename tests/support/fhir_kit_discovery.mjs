// fhir-kit-client's SMART discovery, as an integrator's Node.js code calls it:
//   node fhir_kit_discovery.mjs <node_modules folder> <FHIR base URL> <calls>
// Prints one JSON line: the token and authorize endpoints each call found (null when none).
// Calls run one after another; each races the three discovery documents, as the library does.
import { pathToFileURL } from 'node:url';
import { join } from 'node:path';

const [modules, baseUrl, calls] = process.argv.slice(2);
const { Client } = await import(
  pathToFileURL(join(modules, 'node_modules', 'fhir-kit-client', 'dist', 'index.js')).href
);
const client = new Client({ baseUrl });
const found = [];
for (let i = 0; i < Number(calls); i += 1) {
  try {
    const meta = await client.smartAuthMetadata();
    found.push({
      token: meta.tokenUrl ? meta.tokenUrl.toString() : null,
      authorize: meta.authorizeUrl ? meta.authorizeUrl.toString() : null,
    });
  } catch (error) {
    found.push({ token: null, authorize: null, error: String(error).slice(0, 200) });
  }
}
process.stdout.write(`${JSON.stringify(found)}\n`);
