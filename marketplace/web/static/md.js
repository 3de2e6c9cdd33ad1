// A tiny, safe Markdown subset for model cards.
//
// For: headings, paragraphs, lists (- * + and 1.), fenced and inline code, **strong**, *em*,
// and links whose target is an absolute http(s) URL. Not for: raw HTML, images, tables, or any
// other Markdown: everything else is shown as the text it is.
//
// Safety by construction: the output is built with createElement/createTextNode only (never
// innerHTML), so "<script>" in a card is four characters of text, not an element. Link targets
// are parsed with URL() and kept only if the protocol is http: or https:.

// code | **strong** | __strong__ | *em* | _em_ | [label](url). Underscores never emphasise inside a
// word (snake_case, window.__flag), as in CommonMark.
const INLINE = new RegExp(
  [
    /(`+)([^`][\s\S]*?)\1(?!`)/.source,
    /\*\*(?=\S)(.+?)(?<=\S)\*\*/.source,
    /(?<![\p{L}\p{N}_])__(?=\S)(.+?)(?<=\S)__(?![\p{L}\p{N}_])/.source,
    /\*(?=[^*\s])(.+?)(?<=[^*\s])\*/.source,
    /(?<![\p{L}\p{N}_])_(?=[^_\s])(.+?)(?<=[^_\s])_(?![\p{L}\p{N}_])/.source,
    /\[([^\]]+)\]\(([^()\s]+)\)/.source,
  ].join("|"),
  "gu",
);

/** Return the URL as a string if it is an absolute http(s) URL, else null. */
export function safeHref(href) {
  let u;
  try {
    u = new URL(href);
  } catch {
    return null;
  }
  return u.protocol === "http:" || u.protocol === "https:" ? u.href : null;
}

function inline(doc, text, parent) {
  let last = 0;
  // matchAll works on a copy of the regex, so the recursive calls below cannot disturb it.
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) parent.append(doc.createTextNode(text.slice(last, m.index)));
    last = m.index + m[0].length;
    if (m[1] !== undefined) {
      const code = doc.createElement("code");
      code.textContent = m[2];
      parent.append(code);
    } else if (m[3] !== undefined || m[4] !== undefined) {
      const el = doc.createElement("strong");
      inline(doc, m[3] ?? m[4], el);
      parent.append(el);
    } else if (m[5] !== undefined || m[6] !== undefined) {
      const el = doc.createElement("em");
      inline(doc, m[5] ?? m[6], el);
      parent.append(el);
    } else {
      const href = safeHref(m[8]);
      if (href === null) {
        // Not a link we follow (javascript:, data:, relative...): keep the label as text.
        inline(doc, m[7], parent);
      } else {
        const a = doc.createElement("a");
        a.href = href;
        a.rel = "noopener noreferrer nofollow";
        a.target = "_blank";
        inline(doc, m[7], a);
        parent.append(a);
      }
    }
  }
  if (last < text.length) parent.append(doc.createTextNode(text.slice(last)));
}

const HEADING = /^(#{1,6})\s+(.*?)\s*#*\s*$/;
const FENCE = /^\s*(```|~~~)/;
const UL = /^\s*[-*+]\s+(.*)$/;
const OL = /^\s*\d{1,9}[.)]\s+(.*)$/;

/** Render Markdown source to a DocumentFragment of safe elements. */
export function renderMarkdown(src, doc = document) {
  const out = doc.createDocumentFragment();
  const lines = String(src ?? "")
    .replace(/\r\n?/g, "\n")
    .split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (line.trim() === "") {
      i += 1;
      continue;
    }
    const fence = FENCE.exec(line);
    if (fence) {
      const body = [];
      i += 1;
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
      i += 1; // the closing fence (or the end)
      const pre = doc.createElement("pre");
      const code = doc.createElement("code");
      code.textContent = body.join("\n");
      pre.append(code);
      out.append(pre);
      continue;
    }
    const h = HEADING.exec(line);
    if (h) {
      // Card headings start at h3: the page already has h1/h2.
      const el = doc.createElement(`h${Math.min(h[1].length + 2, 6)}`);
      inline(doc, h[2], el);
      out.append(el);
      i += 1;
      continue;
    }
    if (UL.test(line) || OL.test(line)) {
      const ordered = !UL.test(line);
      const re = ordered ? OL : UL;
      const list = doc.createElement(ordered ? "ol" : "ul");
      while (i < lines.length && re.test(lines[i])) {
        const li = doc.createElement("li");
        inline(doc, re.exec(lines[i])[1], li);
        list.append(li);
        i += 1;
      }
      out.append(list);
      continue;
    }
    const para = [];
    while (
      i < lines.length &&
      lines[i].trim() !== "" &&
      !FENCE.test(lines[i]) &&
      !HEADING.test(lines[i]) &&
      !UL.test(lines[i]) &&
      !OL.test(lines[i])
    ) {
      para.push(lines[i].trim());
      i += 1;
    }
    const p = doc.createElement("p");
    inline(doc, para.join(" "), p);
    out.append(p);
  }
  return out;
}
