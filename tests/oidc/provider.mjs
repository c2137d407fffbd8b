// A real OpenID Provider for the tests: panva's oidc-provider (OpenID Certified), pinned and
// installed into the cache by tools/hl7_packages.py, started by tests/oidc/idp.py.
//
//   node tests/oidc/provider.mjs CONFIG.json
//
// CONFIG: {"modules": folder holding node_modules/oidc-provider, "clients": [oidc-provider client
// metadata], "users_file": JSON of synthetic users, "ttl_seconds": lifetime of this process}.
// Listens on 127.0.0.1 only, on a free port; prints {"issuer": ...} as one line once it
// listens; exits after ttl_seconds, or as soon as its standard input closes (the test ended).
// Users sign in with a username and password on its own page. The users file is read again
// at every sign-in and token, so a test changes a person's groups "at the IdP" by rewriting it.

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const ttlSeconds = Math.min(Number(config.ttl_seconds) || 600, 3600);
const entry = path.join(config.modules, 'node_modules', 'oidc-provider', 'lib', 'index.js');
const { default: Provider } = await import(pathToFileURL(entry).href);

setTimeout(() => process.exit(0), ttlSeconds * 1000);
process.stdin.on('end', () => process.exit(0));
process.stdin.on('close', () => process.exit(0));
process.stdin.resume();

const users = () => JSON.parse(readFileSync(config.users_file, 'utf8'));
const bySubject = (sub) => Object.values(users()).find((u) => u.sub === sub);

const server = http.createServer();
await new Promise((resolve) => { server.listen(0, '127.0.0.1', resolve); });
const issuer = `http://127.0.0.1:${server.address().port}`;
const SCOPES = 'openid profile email groups';

// A signing key of its own for this run (RS256, the algorithm every provider must offer).
const signing = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });

const provider = new Provider(issuer, {
  clients: config.clients,
  jwks: { keys: [{ ...signing, kid: randomBytes(8).toString('hex'), use: 'sig', alg: 'RS256' }] },
  scopes: ['openid', 'profile', 'email', 'groups'],
  claims: {
    openid: ['sub'],
    profile: ['name', 'preferred_username'],
    email: ['email', 'email_verified'],
    groups: ['groups'],
  },
  // The authorization code flow with PKCE is what the service uses: require it of every client.
  pkce: { required: () => true },
  features: { devInteractions: { enabled: false } },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  ttl: {
    AccessToken: 300, AuthorizationCode: 60, IdToken: 300, Interaction: 600,
    Session: ttlSeconds, Grant: ttlSeconds,
  },
  async findAccount(ctx, sub) {
    const user = bySubject(sub);
    if (!user) return undefined;
    return {
      accountId: sub,
      async claims() {
        const now = bySubject(sub) || user; // read again: a change at the IdP applies now
        return {
          sub,
          name: now.name,
          preferred_username: now.username,
          email: now.email,
          email_verified: true,
          groups: now.groups,
        };
      },
    };
  },
  // The organisation registered the web pages as its own application: no consent screen.
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId
      || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    const grant = new ctx.oidc.provider.Grant({
      clientId: ctx.oidc.client.clientId, accountId: ctx.oidc.session.accountId,
    });
    grant.addOIDCScope(SCOPES);
    await grant.save();
    return grant;
  },
});

const escape = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function page(uid, error) {
  return `<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Test IdP sign-in</title></head>
<body><main><h1>Test identity provider</h1>
${error ? `<p role="alert">${escape(error)}</p>` : ''}
<form method="post" action="/interaction/${escape(uid)}">
<label for="username">Username</label> <input id="username" name="username" autocomplete="username">
<label for="password">Password</label> <input id="password" name="password" type="password">
<button type="submit">Sign in at the IdP</button></form></main></body></html>`;
}

async function body(req) {
  let data = '';
  for await (const chunk of req) {
    data += chunk;
    if (data.length > 10000) throw new Error('body too large');
  }
  return new URLSearchParams(data);
}

async function interaction(req, res, uid) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) throw new Error('interaction mismatch');
  if (details.prompt.name !== 'login') {
    // Consent is never asked (loadExistingGrant); anything else is not part of these tests.
    await provider.interactionFinished(req, res, { error: 'access_denied' }, { mergeWithLastSubmission: false });
    return;
  }
  if (req.method === 'GET') {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
    res.end(page(uid, ''));
    return;
  }
  const form = await body(req);
  const user = users()[form.get('username') || ''];
  if (!user || user.password !== form.get('password')) {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
    res.end(page(uid, 'Wrong username or password.'));
    return;
  }
  await provider.interactionFinished(req, res, { login: { accountId: user.sub } }, { mergeWithLastSubmission: false });
}

const callback = provider.callback();
server.on('request', (req, res) => {
  const match = /^\/interaction\/([A-Za-z0-9_-]+)$/.exec(req.url.split('?')[0]);
  if (!match) {
    callback(req, res);
    return;
  }
  interaction(req, res, match[1]).catch((err) => {
    res.writeHead(400, { 'content-type': 'text/plain' });
    res.end(`interaction failed: ${err.message}`);
  });
});

process.stdout.write(`${JSON.stringify({ issuer })}\n`);
