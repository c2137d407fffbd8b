// The test EHR's authorization server for SMART App Launch 2.x: panva's oidc-provider (OpenID
// Certified; pinned in tools/hl7_packages.py, the same package tests/oidc/provider.mjs runs)
// configured as an EHR issues SMART launch context. Started by tests/smart/ehr.py.
//
//   node tests/smart/ehr.mjs CONFIG.json
//
// CONFIG: {"modules": folder holding node_modules/oidc-provider, "clients": [oidc-provider client
// metadata], "users": {username: {sub, password, name, fhirUser}}, "patients": {id: label},
// "fhir_base": the EHR's FHIR base (the only accepted `aud`), "ttl_seconds": lifetime}.
// Listens on 127.0.0.1 only; prints {"issuer": ...} once listening; exits after ttl_seconds or
// when its standard input closes.
//
// What makes it a SMART EHR (SMART App Launch 2.x, "App Launch: Launch and Authorization"):
// - `launch` and `aud` are authorization parameters: an unknown `launch` or an `aud` other than
//   the FHIR base is refused (invalid_request);
// - scopes `launch`, `launch/patient`, `fhirUser`, `patient/*.rs|read` are accepted;
// - an EHR launch's patient comes from the launch (POST /ehr/launches {"patient"} creates one,
//   as the EHR does when the physician opens the app from a chart); a standalone launch's
//   patient is picked on the sign-in page;
// - the token response carries `patient` beside the tokens (a middleware on /token), the ID
//   token carries `fhirUser` (and `name`);
// - PKCE (S256) is required of every client, as SMART 2.0 says;
// - /token/introspection lets the EHR's FHIR server (tests/smart/ehr.py) check access tokens.
// The sign-in page also has a "Deny" button (the physician declines: access_denied).

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const ttlSeconds = Math.min(Number(config.ttl_seconds) || 600, 3600);
const entry = path.join(config.modules, 'node_modules', 'oidc-provider', 'lib', 'index.js');
const { default: Provider, errors } = await import(pathToFileURL(entry).href);

setTimeout(() => process.exit(0), ttlSeconds * 1000);
process.stdin.on('end', () => process.exit(0));
process.stdin.on('close', () => process.exit(0));
process.stdin.resume();

const users = config.users;
const bySubject = (sub) => Object.values(users).find((u) => u.sub === sub);
const launches = new Map(); // launch id -> {patient}
const grants = new Map(); // grant id -> {patient}

const server = http.createServer();
await new Promise((resolve) => { server.listen(0, '127.0.0.1', resolve); });
const issuer = `http://127.0.0.1:${server.address().port}`;
const RESOURCE_SCOPES = ['Patient', 'Condition', 'MedicationRequest', 'Observation', 'AllergyIntolerance', 'Practitioner', '*']
  .flatMap((t) => [`patient/${t}.rs`, `patient/${t}.read`, `user/${t}.rs`, `user/${t}.read`]);
const SCOPES = ['openid', 'fhirUser', 'profile', 'launch', 'launch/patient', 'offline_access', ...RESOURCE_SCOPES];

const signing = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });

const provider = new Provider(issuer, {
  clients: config.clients,
  jwks: { keys: [{ ...signing, kid: randomBytes(8).toString('hex'), use: 'sig', alg: 'RS256' }] },
  scopes: SCOPES,
  claims: { openid: ['sub'], fhirUser: ['fhirUser', 'name'], profile: ['name'] },
  // The scope's claims go into the ID token itself (SMART reads fhirUser from it).
  conformIdTokenClaims: false,
  pkce: { required: () => true },
  clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'private_key_jwt'],
  enabledJWA: { clientAuthSigningAlgValues: ['RS384', 'ES384', 'RS256'] },
  extraParams: {
    async launch(ctx, value) {
      if (value !== undefined && !launches.has(value)) {
        throw new errors.InvalidRequest('unknown or expired launch');
      }
    },
    async aud(ctx, value) {
      if (value !== config.fhir_base) {
        throw new errors.InvalidRequest('aud must be this EHR\'s FHIR base URL');
      }
    },
  },
  features: {
    devInteractions: { enabled: false },
    introspection: { enabled: true, allowedPolicy: async () => true },
    revocation: { enabled: true },
  },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  ttl: {
    AccessToken: 300, AuthorizationCode: 60, IdToken: 300, Interaction: 600,
    Session: ttlSeconds, Grant: ttlSeconds,
  },
  async findAccount(ctx, sub) {
    const user = bySubject(sub);
    if (!user) return undefined;
    return { accountId: sub, async claims() { return { sub, name: user.name, fhirUser: user.fhirUser }; } };
  },
  // The EHR registered the app: no consent screen. A new grant per authorization, holding this
  // launch's context (a grant reused from an earlier launch would carry another patient).
  async loadExistingGrant(ctx) {
    const params = ctx.oidc.params;
    const scopes = String(params.scope || '').split(' ');
    let patient;
    if (params.launch) patient = launches.get(params.launch)?.patient;
    else if (scopes.includes('launch/patient')) patient = ctx.oidc.result?.smart?.patient;
    const grant = new ctx.oidc.provider.Grant({
      clientId: ctx.oidc.client.clientId, accountId: ctx.oidc.session.accountId,
    });
    grant.addOIDCScope(scopes.filter((s) => SCOPES.includes(s)).join(' '));
    const grantId = await grant.save();
    grants.set(grantId, { patient });
    return grant;
  },
});

// SMART: the launch context travels in the token response, beside the tokens.
provider.use(async (ctx, next) => {
  await next();
  if (ctx.path === '/token' && ctx.status === 200 && ctx.body && ctx.body.access_token) {
    const grantId = ctx.oidc?.entities?.Grant?.jti;
    const context = grantId && grants.get(grantId);
    if (context && context.patient) ctx.body.patient = context.patient;
  }
});

const escape = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function page(uid, error, pickPatient) {
  const options = Object.entries(config.patients)
    .map(([id, label]) => `<option value="${escape(id)}">${escape(label)}</option>`).join('');
  const picker = pickPatient
    ? `<label for="patient">Patient</label> <select id="patient" name="patient">${options}</select>`
    : '';
  return `<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Test EHR sign-in</title></head>
<body><main><h1>Test EHR</h1>
${error ? `<p role="alert">${escape(error)}</p>` : ''}
<form method="post" action="/interaction/${escape(uid)}">
<label for="username">Username</label> <input id="username" name="username" autocomplete="username">
<label for="password">Password</label> <input id="password" name="password" type="password">
${picker}
<button type="submit" name="action" value="allow">Sign in at the EHR</button>
<button type="submit" name="action" value="deny">Deny</button></form></main></body></html>`;
}

async function body(req) {
  let data = '';
  for await (const chunk of req) {
    data += chunk;
    if (data.length > 10000) throw new Error('body too large');
  }
  return data;
}

async function interaction(req, res, uid) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) throw new Error('interaction mismatch');
  const scopes = String(details.params.scope || '').split(' ');
  const pickPatient = !details.params.launch && scopes.includes('launch/patient');
  if (details.prompt.name !== 'login') {
    await provider.interactionFinished(req, res, { error: 'access_denied' }, { mergeWithLastSubmission: false });
    return;
  }
  if (req.method === 'GET') {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
    res.end(page(uid, '', pickPatient));
    return;
  }
  const form = new URLSearchParams(await body(req));
  if (form.get('action') === 'deny') {
    await provider.interactionFinished(req, res, { error: 'access_denied', error_description: 'the user declined' }, { mergeWithLastSubmission: false });
    return;
  }
  const user = users[form.get('username') || ''];
  if (!user || user.password !== form.get('password')) {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
    res.end(page(uid, 'Wrong username or password.', pickPatient));
    return;
  }
  const result = { login: { accountId: user.sub } };
  if (pickPatient) result.smart = { patient: form.get('patient') };
  await provider.interactionFinished(req, res, result, { mergeWithLastSubmission: false });
}

async function newLaunch(req, res) {
  const { patient } = JSON.parse(await body(req));
  if (!config.patients[patient]) {
    res.writeHead(400, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ error: 'unknown patient' }));
    return;
  }
  const launch = randomBytes(12).toString('hex');
  launches.set(launch, { patient });
  setTimeout(() => launches.delete(launch), 600 * 1000).unref();
  res.writeHead(201, { 'content-type': 'application/json' });
  res.end(JSON.stringify({ launch }));
}

const callback = provider.callback();
server.on('request', (req, res) => {
  const url = req.url.split('?')[0];
  const match = /^\/interaction\/([A-Za-z0-9_-]+)$/.exec(url);
  let handled;
  if (match) handled = interaction(req, res, match[1]);
  else if (url === '/ehr/launches' && req.method === 'POST') handled = newLaunch(req, res);
  else {
    callback(req, res);
    return;
  }
  handled.catch((err) => {
    res.writeHead(400, { 'content-type': 'text/plain' });
    res.end(`failed: ${err.message}`);
  });
});

process.stdout.write(`${JSON.stringify({ issuer })}\n`);
