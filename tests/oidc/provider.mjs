// A real OpenID Provider on loopback for som's SSO tests: panva's oidc-provider (OpenID-certified).
//
//   node provider.mjs            (configured by the environment)
//   OIDC_PORT       port on 127.0.0.1 (the issuer is http://127.0.0.1:<port>)
//   OIDC_JWKS       path of a private JWKS file (the signing keys); created with one new RS256 key
//                   when absent. Key rotation: write a new file, restart the provider on the port.
//   OIDC_CLIENTS    JSON list of clients [{client_id, client_secret, redirect_uris}]
//   OIDC_ACCOUNTS   path of the static account store (default: accounts.json beside this file);
//                   OIDC_ACCOUNTS_JSON overrides it with inline JSON (a test changing a user's groups)
//
// Logins go through the provider's own development login and consent pages (any password: the
// account store decides who exists and their claims, including "groups"). PKCE is required for
// every client. For the attack tests, POST /__test/next-token {"mode": ...} makes the NEXT token
// response carry a doctored ID token, exactly what a compromised network path or a misbehaving OP
// would hand som: tamper (payload changed, signature kept), wrong_aud, expired, replay (the previous
// ID token again), unknown_key (signed by a key the JWKS does not publish), alg_none.
// GET /__test/stats counts JWKS fetches (som's refetch rate limit).
import { readFileSync, writeFileSync, existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import * as jose from "jose";
import Provider from "oidc-provider";

const here = dirname(fileURLToPath(import.meta.url));
const port = Number(process.env.OIDC_PORT || 9400);
const issuer = `http://127.0.0.1:${port}`;
const jwksPath = process.env.OIDC_JWKS || join(here, "jwks.json");
const clients = JSON.parse(process.env.OIDC_CLIENTS || "[]");
const accounts = JSON.parse(process.env.OIDC_ACCOUNTS_JSON || readFileSync(process.env.OIDC_ACCOUNTS || join(here, "accounts.json"), "utf8"));

async function newSigningKey(kid) {
  const { privateKey } = await jose.generateKeyPair("RS256", { extractable: true });
  return { ...(await jose.exportJWK(privateKey)), kid, alg: "RS256", use: "sig" };
}

if (!existsSync(jwksPath)) {
  writeFileSync(jwksPath, JSON.stringify({ keys: [await newSigningKey(`k-${Date.now()}`)] }), { mode: 0o600 });
}
const jwks = JSON.parse(readFileSync(jwksPath, "utf8"));
const signingJwk = jwks.keys[0];
const signingKey = await jose.importJWK(signingJwk, "RS256");
const attackerJwk = await newSigningKey("attacker");
const attackerKey = await jose.importJWK(attackerJwk, "RS256");

const provider = new Provider(issuer, {
  clients: clients.map((c) => ({
    grant_types: ["authorization_code"],
    response_types: ["code"],
    token_endpoint_auth_method: "client_secret_basic",
    ...c,
  })),
  jwks,
  cookies: { keys: ["som-test-op-cookie-key-1"] },
  pkce: { required: () => true },
  conformIdTokenClaims: false, // scope claims (groups) in the ID token, as most enterprise IdPs do
  scopes: ["openid", "email", "profile", "groups"],
  claims: { openid: ["sub"], email: ["email", "email_verified"], profile: ["name"], groups: ["groups"] },
  features: { devInteractions: { enabled: true } },
  async findAccount(ctx, sub) {
    const a = accounts[sub];
    if (!a) return undefined;
    return {
      accountId: sub,
      async claims() {
        return { sub, email: a.email, email_verified: true, name: a.name, groups: a.groups };
      },
    };
  },
});

let nextMode = "normal";
let lastIdToken = null;
let jwksFetches = 0;

function b64json(part) {
  return JSON.parse(Buffer.from(part, "base64url").toString("utf8"));
}

async function doctor(idToken, mode) {
  const [h, p, s] = idToken.split(".");
  const claims = b64json(p);
  const now = Math.floor(Date.now() / 1000);
  const sign = (payload, key = signingKey, kid = signingJwk.kid) =>
    new jose.SignJWT(payload).setProtectedHeader({ alg: "RS256", kid }).sign(key);
  switch (mode) {
    case "tamper": {
      const forged = { ...claims, groups: ["acme-admins"], sub: "alice" };
      return `${h}.${Buffer.from(JSON.stringify(forged)).toString("base64url")}.${s}`;
    }
    case "wrong_aud":
      return sign({ ...claims, aud: "another-app", azp: undefined });
    case "expired":
      return sign({ ...claims, iat: now - 7200, exp: now - 3600 });
    case "unknown_key":
      return sign(claims, attackerKey, "attacker");
    case "alg_none":
      return `${Buffer.from(JSON.stringify({ alg: "none" })).toString("base64url")}.${p}.`;
    case "replay":
      return lastIdToken ?? idToken;
    default:
      return idToken;
  }
}

provider.use(async (ctx, next) => {
  if (ctx.path === "/__test/next-token" && ctx.method === "POST") {
    const chunks = [];
    for await (const c of ctx.req) chunks.push(c);
    nextMode = JSON.parse(Buffer.concat(chunks).toString("utf8") || "{}").mode || "normal";
    ctx.body = { mode: nextMode };
    return;
  }
  if (ctx.path === "/__test/stats") {
    ctx.body = { jwks_fetches: jwksFetches, kid: signingJwk.kid };
    return;
  }
  if (ctx.path === "/jwks") jwksFetches += 1;
  await next();
  if (ctx.path === "/token" && ctx.status === 200 && ctx.body && ctx.body.id_token) {
    const real = ctx.body.id_token;
    const mode = nextMode;
    nextMode = "normal";
    ctx.body = { ...ctx.body, id_token: await doctor(real, mode) };
    lastIdToken = real;
  }
});

provider.listen(port, "127.0.0.1", () => {
  process.stdout.write(`oidc-provider listening on ${issuer} (signing key ${signingJwk.kid})\n`);
});
