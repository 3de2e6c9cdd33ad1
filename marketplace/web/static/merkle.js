// RFC 9162 inclusion proofs and C2SP signed-note checkpoints, verified in the browser (WebCrypto).
//
// For: checking that a ledger leaf is in the tree whose root a signed checkpoint commits to, and
// that the checkpoint is signed by the log's key. Not for: consistency proofs or witness
// cosignatures (use `som ledger verify` / `som ledger witness` offline for the whole story).
// verify* functions resolve to undefined or reject with an Error; they never resolve to a boolean.

const enc = new TextEncoder();

export function b64decode(text) {
  const s = String(text).replace(/-/g, "+").replace(/_/g, "/");
  const bin = atob(s + "=".repeat((4 - (s.length % 4)) % 4));
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i += 1) out[i] = bin.charCodeAt(i);
  return out;
}

export function b64encode(bytes) {
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin);
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
}

function equal(a, b) {
  if (a.length !== b.length) return false;
  let d = 0;
  for (let i = 0; i < a.length; i += 1) d |= a[i] ^ b[i];
  return d === 0;
}

async function sha256(bytes) {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
}

/** RFC 9162 §2.1.1: SHA-256(0x00 || leaf). */
export function leafHash(leaf) {
  return sha256(concat(new Uint8Array([0]), leaf));
}

/** RFC 9162 §2.1.1: SHA-256(0x01 || left || right). */
export function nodeHash(left, right) {
  return sha256(concat(new Uint8Array([1]), left, right));
}

/** RFC 9162 §2.1.3.2: the root implied by an inclusion proof (rejects a malformed proof). */
export async function rootFromInclusionProof(index, size, leafHashBytes, proof) {
  if (!Number.isSafeInteger(index) || !Number.isSafeInteger(size) || index < 0 || index >= size) {
    throw new Error(`need 0 <= index < size, got index ${index}, size ${size}`);
  }
  if (leafHashBytes.length !== 32 || proof.some((p) => p.length !== 32)) {
    throw new Error("hashes must be 32 bytes");
  }
  let fn = index;
  let sn = size - 1;
  let r = leafHashBytes;
  for (const p of proof) {
    if (sn === 0) throw new Error("inclusion proof is too long");
    if (fn % 2 === 1 || fn === sn) {
      r = await nodeHash(p, r);
      if (fn % 2 === 0) {
        while (fn % 2 === 0 && fn !== 0) {
          fn = Math.floor(fn / 2);
          sn = Math.floor(sn / 2);
        }
      }
    } else {
      r = await nodeHash(r, p);
    }
    fn = Math.floor(fn / 2);
    sn = Math.floor(sn / 2);
  }
  if (sn !== 0) throw new Error("inclusion proof is too short");
  return r;
}

/** Reject unless SHA-256(0x00||leaf) at index is in the tree of `size` with root `root`. */
export async function verifyInclusion(leaf, index, size, proof, root) {
  const lh = await leafHash(leaf);
  const got = await rootFromInclusionProof(index, size, lh, proof);
  if (!equal(got, root)) throw new Error("inclusion proof does not lead to the checkpoint's root");
}

/** Split a C2SP signed note into its text (ending in "\n") and its signature lines. */
export function parseNote(note) {
  const split = note.lastIndexOf("\n\n");
  if (split < 0) throw new Error("note has no signature block");
  const body = note.slice(0, split + 1);
  const block = note.slice(split + 2);
  if (!block.endsWith("\n")) throw new Error("note does not end with a newline");
  const sigs = block
    .slice(0, -1)
    .split("\n")
    .map((l) => {
      const m = /^\u2014 (\S+) (\S+)$/.exec(l);
      if (!m) throw new Error("malformed signature line");
      return { name: m[1], blob: b64decode(m[2]) };
    });
  return { body, sigs };
}

/** Parse a C2SP tlog checkpoint note: origin, tree size, root hash (signatures not checked). */
export function parseCheckpoint(note) {
  const { body, sigs } = parseNote(note);
  const lines = body.split("\n");
  if (lines.length < 4 || !/^(0|[1-9]\d*)$/.test(lines[1])) throw new Error("malformed checkpoint body");
  const root = b64decode(lines[2]);
  if (root.length !== 32) throw new Error("checkpoint root hash is not 32 bytes");
  return { body, origin: lines[0], size: Number(lines[1]), root, sigs };
}

/** Reject unless the note carries a valid Ed25519 signature by vkey `name+hex(id)+b64(0x01||pub)`. */
export async function verifyNoteSignature(note, vkey) {
  // name+hex(id)+base64(key): the name has no "+", the base64 may.
  const text = String(vkey).trim();
  const i = text.indexOf("+");
  const j = text.indexOf("+", i + 1);
  if (i <= 0 || j < 0) throw new Error("malformed verifier key");
  const [name, idHex, keyB64] = [text.slice(0, i), text.slice(i + 1, j), text.slice(j + 1)];
  const key = b64decode(keyB64);
  if (key.length !== 33 || key[0] !== 0x01) throw new Error("verifier key is not Ed25519");
  const pub = key.slice(1);
  const id = (await sha256(concat(enc.encode(name + "\n"), new Uint8Array([0x01]), pub))).slice(0, 4);
  const idText = Array.from(id, (b) => b.toString(16).padStart(2, "0")).join("");
  if (idText !== idHex.toLowerCase()) throw new Error("verifier key id does not match its key");
  const { body, sigs } = parseNote(note);
  const ck = await crypto.subtle.importKey("raw", pub, { name: "Ed25519" }, false, ["verify"]);
  for (const s of sigs) {
    if (s.name !== name || s.blob.length !== 68 || !equal(s.blob.slice(0, 4), id)) continue;
    if (await crypto.subtle.verify({ name: "Ed25519" }, ck, s.blob.slice(4), enc.encode(body))) return;
  }
  throw new Error("no valid signature by the log's key");
}

/** Parse a C2SP note verifier key `name+hex(id)+base64(0x01||pub)` (the id is not checked here). */
export function parseVkey(vkey) {
  const text = String(vkey).trim();
  const i = text.indexOf("+");
  const j = text.indexOf("+", i + 1);
  if (i <= 0 || j < 0) throw new Error("malformed verifier key");
  const key = b64decode(text.slice(j + 1));
  if (key.length !== 33 || key[0] !== 0x01) throw new Error("verifier key is not Ed25519");
  return { name: text.slice(0, i), idHex: text.slice(i + 1, j), key };
}

/** The fingerprint people compare out of band, as `crypto.logverify.vkey_fingerprint`:
 * SHA-256 of the key bytes (type byte and public key), first 16 hex digits in groups of 4. */
export async function vkeyFingerprint(vkey) {
  const { key } = parseVkey(vkey);
  const hex = Array.from(await sha256(key), (b) => b.toString(16).padStart(2, "0"))
    .join("")
    .slice(0, 16);
  return hex.match(/.{4}/g).join(" ");
}

/** Same key and name (whitespace around the text ignored). */
export function sameVkey(a, b) {
  return String(a).trim() === String(b).trim();
}
