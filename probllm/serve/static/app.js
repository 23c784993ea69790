// The chat page: talks to the OpenAI-compatible API of `probllm serve` on the same origin.
//
// - Answers stream over SSE from /v1/chat/completions (stream: true). With `serve --index`, the first chunk
//   carries `sources` (numbered as the answer cites them); they are listed under the answer and open to show
//   the passage. The whole conversation is sent with each question (cut oldest first to fit the model).
// - With `serve --api-key`, a 401 makes the page ask for the key once; it lives in sessionStorage (this tab).
// - When the server cannot be reached the page says so, keeps the question, polls /v1/models, and says when
//   the server is back; nothing is lost.
"use strict";

(function () {
  const KEY_STORAGE = "probllm-api-key";
  const POLL_MS = 3000;
  const DEFAULT_CONTEXT_TOKENS = 2048; // when /v1/models does not say
  const CHARS_PER_TOKEN = 3;           // a cautious estimate: cutting a little early beats a 400

  const $ = (id) => document.getElementById(id);
  const conversationEl = $("conversation");
  const welcomeEl = $("welcome");
  const questionEl = $("question");
  const sendEl = $("send");
  const stopEl = $("stop");
  const bannerEl = $("banner");
  const statusEl = $("status");
  const statusTextEl = $("status-text");
  const keyDialog = $("key-dialog");

  const state = {
    model: null,
    contextTokens: DEFAULT_CONTEXT_TOKENS,
    history: [],        // [{role, content}] of finished turns
    busy: false,
    controller: null,
    online: null,       // null until the first check
    pollTimer: null,
    turn: 0,
  };

  // ------------------------------------------------------------------------------------------ server access

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  class Unreachable extends Error {}
  class HttpError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch (_) { /* not JSON */ }
    return response.status + " " + response.statusText;
  }

  async function api(path, options) {
    let response;
    try {
      response = await fetch(path, Object.assign({ headers: headers() }, options || {}));
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new Unreachable(String(e.message || e));
    }
    if (response.status === 401) {
      const message = await errorMessage(response);
      await askForKey(sessionStorage.getItem(KEY_STORAGE) ? "That key was refused (" + message + "). " +
        "Enter the server's API key." : null);
      return api(path, options);
    }
    // 502/503/504: this server answers, the model server behind it (--backend openai) does not.
    if (response.status >= 502 && response.status <= 504) throw new Unreachable(await errorMessage(response));
    if (!response.ok) throw new HttpError(response.status, await errorMessage(response));
    return response;
  }

  let keyPromise = null;
  function askForKey(message) {
    if (keyPromise) return keyPromise; // one dialog, however many requests are waiting
    keyPromise = new Promise((resolve) => {
      if (message) $("key-message").textContent = message;
      $("key-input").value = "";
      keyDialog.showModal();
      keyDialog.addEventListener("close", function onClose() {
        keyDialog.removeEventListener("close", onClose);
        const key = $("key-input").value.trim();
        if (key) sessionStorage.setItem(KEY_STORAGE, key);
        keyPromise = null;
        resolve();
      });
    });
    return keyPromise;
  }
  // A dialog closed with Escape still resolves, with the key unchanged; the next 401 asks again.

  async function checkServer() {
    try {
      const response = await api("v1/models");
      const body = await response.json();
      const first = body && body.data && body.data[0];
      if (first) {
        state.model = first.id;
        const n = first.max_model_len || first.context_length || first.max_context_length;
        if (Number.isFinite(n) && n > 0) state.contextTokens = n;
      }
      setOnline(true);
      return true;
    } catch (e) {
      if (e instanceof Unreachable) { setOnline(false); return false; }
      if (e instanceof HttpError) { setOnline(true); return true; } // it answers: reachable
      throw e;
    }
  }

  function setOnline(online) {
    const was = state.online;
    state.online = online;
    statusEl.dataset.state = online ? "online" : "offline";
    statusTextEl.textContent = online ? (state.model || "connected") : "unreachable";
    if (!online) {
      showBanner("offline", "Cannot reach the assistant server. Your question is kept; " +
        "the page retries every few seconds.");
      if (!state.pollTimer) state.pollTimer = setInterval(checkServer, POLL_MS);
    } else {
      if (state.pollTimer) { clearInterval(state.pollTimer); state.pollTimer = null; }
      if (was === false) {
        showBanner("online", "The server is back. You can send your question again.");
        setTimeout(() => { if (state.online) hideBanner(); }, 4000);
      }
    }
    updateControls();
  }

  function showBanner(kind, text) {
    bannerEl.dataset.kind = kind;
    bannerEl.textContent = text;
    bannerEl.hidden = false;
  }
  function hideBanner() { bannerEl.hidden = true; }

  // Generation settings from the page's address, e.g. /?temperature=0.7&max_tokens=400&seed=1 (the server's
  // defaults otherwise: greedy).
  function generationSettings() {
    const query = new URLSearchParams(window.location.search);
    const out = {};
    for (const [name, parse] of [["temperature", parseFloat], ["top_p", parseFloat], ["max_tokens", parseInt],
                                 ["seed", parseInt], ["repetition_penalty", parseFloat]]) {
      const value = parse(query.get(name));
      if (Number.isFinite(value)) out[name] = value;
    }
    return out;
  }

  // ---------------------------------------------------------------------------------------------- history

  // The messages sent for a new question: the whole conversation, oldest turns dropped first until it fits
  // the model's context (with room for the answer and the notes the server adds).
  function messagesFor(question) {
    const budgetChars = Math.max(2000, Math.floor(state.contextTokens * 0.5) * CHARS_PER_TOKEN);
    let past = state.history.slice();
    const size = (msgs) => msgs.reduce((n, m) => n + m.content.length, 0) + question.length;
    while (past.length && size(past) > budgetChars) past = past.slice(2); // a user+assistant pair at a time
    return past.concat([{ role: "user", content: question }]);
  }

  // -------------------------------------------------------------------------------------------- rendering

  function renderInto(el, text, options) {
    el.innerHTML = window.ProbMarkdown.render(text, options);
    if (window.renderMathInElement) {
      try {
        window.renderMathInElement(el, {
          delimiters: [
            { left: "$$", right: "$$", display: true },
            { left: "\\[", right: "\\]", display: true },
            { left: "\\(", right: "\\)", display: false },
            { left: "$", right: "$", display: false },
          ],
          throwOnError: false,
        });
      } catch (_) { /* half-written math while streaming: shown as text until complete */ }
    }
  }

  function scrollToEnd() {
    window.scrollTo({ top: document.body.scrollHeight });
  }

  function addUserMessage(text) {
    welcomeEl.hidden = true;
    const el = document.createElement("article");
    el.className = "msg user";
    const body = document.createElement("div");
    body.className = "bubble";
    body.textContent = text;
    el.appendChild(body);
    conversationEl.appendChild(el);
    return el;
  }

  function addAssistantMessage() {
    state.turn += 1;
    const el = document.createElement("article");
    el.className = "msg assistant";
    el.dataset.turn = String(state.turn);
    el.innerHTML =
      '<div class="answer" data-state="waiting" data-chunks="0"><span class="thinking">Looking it up' +
      '<span class="dots"><i></i><i></i><i></i></span></span></div>' +
      '<section class="sources" hidden><h3>Sources</h3><ol class="source-list"></ol></section>' +
      '<p class="note" hidden></p>';
    conversationEl.appendChild(el);
    el.querySelector(".answer").addEventListener("click", (event) => {
      const cite = event.target.closest(".cite");
      if (cite) openSource(el, cite.dataset.n);
    });
    return el;
  }

  function showSources(msgEl, sources) {
    if (!Array.isArray(sources) || !sources.length) return;
    const section = msgEl.querySelector(".sources");
    const list = section.querySelector(".source-list");
    list.innerHTML = "";
    sources.forEach((s, i) => {
      const n = s.n || i + 1;
      const li = document.createElement("li");
      li.className = "source";
      li.dataset.n = String(n);
      const details = document.createElement("details");
      const summary = document.createElement("summary");
      const num = document.createElement("span");
      num.className = "num";
      num.textContent = String(n);
      const heading = document.createElement("span");
      heading.className = "heading";
      heading.textContent = s.heading || s.source || s.id || "passage";
      summary.append(num, heading, sourceLocation(s));
      if (s.document) summary.append(documentLink(s));
      if (s.citation) summary.title = s.citation;
      const passage = document.createElement("div");
      passage.className = "passage";
      details.append(summary, passage);
      // Rendered when first opened: a long note list costs nothing until read.
      details.addEventListener("toggle", () => {
        if (details.open && !passage.dataset.rendered) {
          renderInto(passage, withoutHeading(s.text || "", s.heading), { softBreaks: true });
          passage.dataset.rendered = "1";
        }
      });
      li.appendChild(details);
      list.appendChild(li);
    });
    section.hidden = false;
  }

  // ------------------------------------------------------------------------------------- citations

  // `file, p. N` of a source (the server formats it: `location`, and `citation` with the heading).
  function sourceLocation(s) {
    const where = document.createElement("span");
    where.className = "where";
    where.textContent = s.location || s.source || "";
    return where;
  }

  // A link to the indexed file at the source's page, when the server serves it (`document`: documents/ID#page=N).
  // A small link of its own, so that a click on the rest of the line still opens the passage.
  function documentLink(s) {
    const link = document.createElement("a");
    link.className = "open-document";
    link.href = s.document;
    link.target = "_blank";
    link.rel = "noopener";
    link.textContent = "open";
    link.title = "Open " + (s.citation || s.location || s.source || "the document");
    link.addEventListener("click", (event) => {
      event.stopPropagation(); // opening the file does not fold or unfold the passage
      openDocument(event, link);
    });
    return link;
  }

  // With an API key, a plain link cannot send it: fetch the file with the key and open it from memory at the
  // same page anchor. Without a key the browser follows the link itself.
  async function openDocument(event, link) {
    if (!sessionStorage.getItem(KEY_STORAGE)) return;
    event.preventDefault();
    const [path, anchor] = link.getAttribute("href").split("#");
    const opened = window.open("", "_blank");
    try {
      const response = await api(path, { method: "GET" });
      const url = URL.createObjectURL(await response.blob());
      if (opened) opened.location.href = url + (anchor ? "#" + anchor : "");
    } catch (e) {
      if (opened) opened.close();
    }
  }

  // The `[n]` markers of an answer: each names its source on hover (`file, p. N > heading`).
  function labelCitations(msgEl, sources) {
    if (!Array.isArray(sources)) return;
    const byNumber = new Map(sources.map((s, i) => [String(s.n || i + 1), s]));
    msgEl.querySelectorAll(".answer .cite").forEach((cite) => {
      const s = byNumber.get(cite.dataset.n);
      if (s && s.citation) cite.title = "Source " + cite.dataset.n + ": " + s.citation;
    });
  }

  // Chunks start with their section's title, which the summary line shows already.
  function withoutHeading(text, heading) {
    const last = String(heading || "").split(" > ").pop().trim();
    const lines = text.split("\n");
    if (last && lines.length > 1 && lines[0].replace(/^#+\s*/, "").trim() === last) {
      return lines.slice(1).join("\n").replace(/^\s*\n/, "");
    }
    return text;
  }

  function openSource(msgEl, n) {
    const li = msgEl.querySelector('.source[data-n="' + n + '"]');
    if (!li) return;
    const details = li.querySelector("details");
    details.open = true;
    li.classList.add("flash");
    setTimeout(() => li.classList.remove("flash"), 1200);
    li.scrollIntoView({ behavior: "smooth", block: "nearest" });
  }

  function setNote(msgEl, kind, text) {
    const note = msgEl.querySelector(".note");
    note.dataset.kind = kind;
    note.textContent = text;
    note.hidden = !text;
  }

  // ------------------------------------------------------------------------------------------------ asking

  async function ask(question) {
    question = question.trim();
    if (!question || state.busy) return;
    if (state.online === false) {
      // Try now rather than make the student wait for the next poll.
      if (!(await checkServer())) return;
    }
    if (window.ProbFeedback && window.ProbFeedback.comparing()) return window.ProbFeedback.askCompare(question);
    addUserMessage(question);
    const msgEl = addAssistantMessage();
    const answerEl = msgEl.querySelector(".answer");
    questionEl.value = "";
    autoGrow();
    state.busy = true;
    state.controller = new AbortController();
    updateControls();
    scrollToEnd();

    let text = "";
    let chunks = 0;
    let pending = false;
    let sources = null;
    const paint = () => {
      pending = false;
      renderInto(answerEl, text);
      labelCitations(msgEl, sources);
      scrollToEnd();
    };
    const schedule = () => {
      if (!pending) { pending = true; requestAnimationFrame(paint); }
    };

    const body = Object.assign({ messages: messagesFor(question), stream: true }, generationSettings());
    if (state.model) body.model = state.model;
    let outcome = "done";
    const served = { model: state.model, sources: [] }; // what feedback records about this answer
    try {
      const response = await api("v1/chat/completions", {
        method: "POST", body: JSON.stringify(body), signal: state.controller.signal,
      });
      answerEl.dataset.state = "streaming";
      for await (const event of sseEvents(response)) {
        if (event.sources) { sources = event.sources; showSources(msgEl, sources); }
        if (event.error) throw new HttpError(500, event.error.message || "the server reported an error");
        const choice = event.choices && event.choices[0];
        Object.assign(served, { model: event.model || served.model, sources: event.sources || served.sources });
        const delta = choice && choice.delta && choice.delta.content;
        if (delta) {
          text += delta;
          chunks += 1;
          answerEl.dataset.chunks = String(chunks);
          schedule();
        }
      }
    } catch (e) {
      if (e.name === "AbortError") {
        outcome = "stopped";
      } else if (e instanceof Unreachable || e instanceof TypeError) {
        outcome = "unreachable";
        setOnline(false);
      } else if (e instanceof HttpError) {
        outcome = "error";
        setNote(msgEl, "error", "The server could not answer: " + e.message);
      } else {
        outcome = "error";
        setNote(msgEl, "error", "Something went wrong: " + (e.message || e));
      }
    }

    paint();
    answerEl.dataset.state = outcome === "done" ? "done" : outcome;
    if (outcome === "stopped") setNote(msgEl, "info", "Stopped.");
    if (outcome === "unreachable") {
      setNote(msgEl, "error", text ? "The connection was lost in the middle of this answer."
        : "Not sent: the server could not be reached.");
      questionEl.value = question; // kept, to send again when the server is back
      autoGrow();
    }
    if (!text && outcome === "done") {
      answerEl.innerHTML = '<span class="empty">(the model returned an empty answer)</span>';
    }
    // A turn enters the history when something was answered; a stopped answer counts as said.
    if (text && outcome !== "unreachable" && outcome !== "error") {
      state.history.push({ role: "user", content: question }, { role: "assistant", content: text });
      if (window.ProbFeedback) {
        window.ProbFeedback.rateable(msgEl, Object.assign({ messages: body.messages, text }, served));
      }
    }
    state.busy = false;
    state.controller = null;
    updateControls();
    scrollToEnd();
    questionEl.focus();
  }

  // Server-sent events from a fetch response: yields each `data:` payload parsed as JSON until [DONE].
  async function* sseEvents(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (e) {
        if (e.name === "AbortError") throw e;
        throw new Unreachable(String(e.message || e));
      }
      if (chunk.done) break;
      buffer += decoder.decode(chunk.value, { stream: true });
      let cut;
      while ((cut = buffer.search(/\r?\n\r?\n/)) !== -1) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
        const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }

  function startOver() {
    if (state.controller) state.controller.abort();
    state.history = [];
    state.turn = 0;
    conversationEl.querySelectorAll(".msg").forEach((el) => el.remove());
    welcomeEl.hidden = false;
    questionEl.value = "";
    autoGrow();
    questionEl.focus();
  }

  // -------------------------------------------------------------------------------------------- controls

  function updateControls() {
    sendEl.hidden = state.busy;
    stopEl.hidden = !state.busy;
    sendEl.disabled = state.online === false;
  }

  function autoGrow() {
    questionEl.style.height = "auto";
    questionEl.style.height = Math.min(questionEl.scrollHeight, 200) + "px";
  }

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    ask(questionEl.value);
  });
  questionEl.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      ask(questionEl.value);
    }
  });
  questionEl.addEventListener("input", autoGrow);
  stopEl.addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("new-chat").addEventListener("click", startOver);
  document.querySelectorAll(".suggestion").forEach((b) => b.addEventListener("click", () => ask(b.textContent)));

  // What feedback.js (ratings and compare mode, with `serve --feedback`) builds on.
  window.ProbChat = {
    state, api, sseEvents, renderInto, showSources, openSource, setNote, messagesFor, generationSettings,
    addUserMessage, scrollToEnd, updateControls, autoGrow, setOnline, Unreachable, HttpError,
  };

  checkServer();
  questionEl.focus();
})();
