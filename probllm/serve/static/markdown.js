// A small, safe markdown renderer for answers and source passages.
//
// Safety first: the input is HTML-escaped before anything else, and only the tags produced here are ever
// emitted, so neither a model's answer nor a note can inject markup or script. Code (fenced blocks and inline)
// and math ($...$, $$...$$, \(...\), \[...\]) are cut out before the markdown rules run, so `*`, `_` and `#`
// inside them are left alone; math goes back in as escaped text with its delimiters for KaTeX's auto-render,
// which skips <pre> and <code>. Links are not turned into anchors: an answer cannot send a student elsewhere.
"use strict";

(function (root) {
  function escapeHtml(text) {
    return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  // Placeholders use private-use characters, which escaped text cannot contain.
  const OPEN = "\uE000", CLOSE = "\uE001";

  function protect(store, html) {
    store.push(html);
    return OPEN + (store.length - 1) + CLOSE;
  }

  function restore(store, text) {
    // Placeholders may nest (math inside a list item inside...), so repeat until none is left.
    const re = new RegExp(OPEN + "(\\d+)" + CLOSE, "g");
    for (let i = 0; i < 3 && text.indexOf(OPEN) !== -1; i++) {
      text = text.replace(re, (_, n) => store[Number(n)]);
    }
    return text;
  }

  function inline(text, store) {
    // Inline code first, then math, then emphasis on what is left.
    text = text.replace(/`([^`\n]+)`/g, (_, code) => protect(store, "<code>" + code + "</code>"));
    text = text.replace(/\\\((.+?)\\\)/g, (m) => protect(store, m));
    text = text.replace(/(^|[^\\$])\$(?!\s)([^$\n]+?)\$(?!\d)/g, (m, pre, body) =>
      pre + protect(store, "$" + body + "$"));
    text = text.replace(/\*\*(?=\S)([^*]+?)\*\*/g, "<strong>$1</strong>");
    text = text.replace(/__(?=\S)([^_]+?)__/g, "<strong>$1</strong>");
    text = text.replace(/(^|[^*\w])\*(?=\S)([^*\n]+?)\*(?!\w)/g, "$1<em>$2</em>");
    text = text.replace(/(^|[^_\w])_(?=\S)([^_\n]+?)_(?!\w)/g, "$1<em>$2</em>");
    // Citations like [1] or [1, 3] become buttons that open the numbered source (app.js wires the click).
    text = text.replace(/\[(\d{1,2}(?:\s*,\s*\d{1,2})*)\]/g, (m, nums) =>
      nums.split(/\s*,\s*/).map((n) =>
        '<button type="button" class="cite" data-n="' + n + '" title="Source ' + n + '">' + n + "</button>"
      ).join(""));
    return text;
  }

  // options.softBreaks: a single newline is a space (hard-wrapped notes); otherwise a line break (answers).
  function render(source, options) {
    const softBreaks = Boolean(options && options.softBreaks);
    const store = [];
    let text = escapeHtml(String(source || "").replace(/\r\n?/g, "\n"));

    // Fenced code blocks (an unclosed fence while streaming still renders as code up to the end).
    text = text.replace(/(^|\n)```([\w+-]*)[^\n]*\n([\s\S]*?)(?:\n```[ \t]*(?=\n|$)|$)/g, (_, pre, lang, code) =>
      pre + protect(store, '<pre><code' + (lang ? ' class="language-' + lang + '"' : "") + ">" + code +
        "</code></pre>") + "\n");
    // Display math keeps its own block (it may span lines).
    text = text.replace(/\$\$([\s\S]+?)\$\$/g, (m) => protect(store, '<div class="math-display">' + m + "</div>"));
    text = text.replace(/\\\[([\s\S]+?)\\\]/g, (m) => protect(store, '<div class="math-display">' + m + "</div>"));

    const out = [];
    let para = [];
    let list = null; // {tag, items}
    const flushPara = () => {
      if (para.length) {
        out.push("<p>" + inline(para.join("\n"), store).replace(/\n/g, softBreaks ? " " : "<br>") + "</p>");
      }
      para = [];
    };
    const flushList = () => {
      if (list) {
        out.push("<" + list.tag + ">" + list.items.map((it) => "<li>" + inline(it, store) + "</li>").join("") +
          "</" + list.tag + ">");
      }
      list = null;
    };

    for (const line of text.split("\n")) {
      let m;
      if (/^\s*$/.test(line)) {
        flushPara(); flushList();
      } else if (new RegExp("^\\s*" + OPEN + "\\d+" + CLOSE + "\\s*$").test(line) && para.length === 0) {
        flushList();
        out.push(line.trim()); // a code block or display math on its own line
      } else if ((m = /^(#{1,4})\s+(.*)$/.exec(line))) {
        flushPara(); flushList();
        const level = Math.min(6, m[1].length + 2); // answers' headings stay smaller than the page's
        out.push("<h" + level + ">" + inline(m[2], store) + "</h" + level + ">");
      } else if ((m = /^\s*[-*+]\s+(.*)$/.exec(line)) || (m = /^\s*\d+[.)]\s+(.*)$/.exec(line))) {
        flushPara();
        const tag = /^\s*\d/.test(line) ? "ol" : "ul";
        if (!list || list.tag !== tag) { flushList(); list = { tag, items: [] }; }
        list.items.push(m[1]);
      } else if (list && /^\s{2,}\S/.test(line)) {
        list.items[list.items.length - 1] += "\n" + line.trim(); // continuation of a list item
      } else if ((m = /^&gt;\s?(.*)$/.exec(line))) {
        flushPara(); flushList();
        out.push("<blockquote>" + inline(m[1], store) + "</blockquote>");
      } else {
        flushList();
        para.push(line);
      }
    }
    flushPara(); flushList();
    return restore(store, out.join("\n"));
  }

  const api = { render, escapeHtml };
  if (typeof module !== "undefined" && module.exports) module.exports = api;
  else root.ProbMarkdown = api;
})(typeof window !== "undefined" ? window : this);
