// Students' feedback, when the server records it (`probllm serve --feedback FILE.sqlite`):
//
// - Ratings: a thumbs up/down under each answer, then an optional comment.
// - Compare mode (`serve --compare`): each question is answered twice (two sampled answers with different seeds,
//   or with and without the notes: the server's `compare_by`). The page sends both requests itself and records
//   each response's `model`. The two are shown side by side, unlabelled, in an order seeded by the question; the
//   student picks the better one overall (or a tie, or both bad) and ticks the four criteria of the report for
//   each answer. Answer 1 (left) is A in the stored vote, answer 2 is B.
//
// Every vote carries a vote id made here and the session id this browser keeps in localStorage (random: no name,
// nothing about the student). Sending a vote id again replaces the earlier version (a changed mind, a comment
// added). A vote waits in localStorage until the server has answered 200, and is retried every few seconds
// while the server is down, so neither a closed tab nor a restarted server loses it.
"use strict";

(function () {
  const SESSION_STORAGE = "probllm-feedback-session";
  const PENDING_STORAGE = "probllm-feedback-pending";
  const RETRY_MS = 2000;
  const CRITERIA = [["correctness", "correct"], ["relevance", "relevant"], ["clarity", "clear"],
                    ["completeness", "complete"]];
  const VERDICTS = [["A", "Answer 1"], ["B", "Answer 2"], ["AB", "Tie"], ["None", "Both bad"]];
  const THUMB = '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M14 9V5a3 3 0 0 0-3-3l-4 9v11h11.28a2 2 ' +
    '0 0 0 2-1.7l1.38-9a2 2 0 0 0-2-2.3zM7 22H4a2 2 0 0 1-2-2v-7a2 2 0 0 1 2-2h3"/></svg>';

  const chat = window.ProbChat;
  const feedback = { config: null, retryTimer: null, sending: Promise.resolve() };

  // ---------------------------------------------------------------------------------------------- identity

  function randomId() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes); // also on plain http, unlike crypto.randomUUID
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function sessionId() {
    let id = localStorage.getItem(SESSION_STORAGE);
    if (!id) {
      id = randomId();
      localStorage.setItem(SESSION_STORAGE, id);
    }
    return id;
  }

  // FNV-1a: a 32-bit number from text, so that a question's seeds and its order of answers are reproducible.
  function hash32(text) {
    let h = 0x811c9dc5;
    for (let i = 0; i < text.length; i++) {
      h ^= text.charCodeAt(i);
      h = Math.imul(h, 0x01000193) >>> 0;
    }
    return h;
  }

  // --------------------------------------------------------------------------------------- server settings

  async function loadConfig() {
    try {
      const response = await chat.api("v1/feedback/config");
      feedback.config = await response.json();
    } catch (e) {
      if (e instanceof chat.Unreachable) { setTimeout(loadConfig, RETRY_MS); return; }
      feedback.config = null; // 404: this server records no feedback
    }
    document.body.dataset.feedback = !feedback.config ? "off" : feedback.config.compare ? "compare" : "ratings";
    if (feedback.config && feedback.config.compare) {
      const intro = document.createElement("p");
      intro.className = "compare-intro";
      intro.textContent = "Compare mode: each question gets two answers side by side. Tell us which one is " +
        "better, and what holds for each: your votes help train the next version of the assistant.";
      document.getElementById("welcome").appendChild(intro);
    }
    if (feedback.config) flush(); // votes a closed tab or a down server left waiting
  }

  function comparing() {
    return Boolean(feedback.config && feedback.config.compare);
  }

  // --------------------------------------------------------------------------------------- sending votes

  function pendingVotes() {
    try { return JSON.parse(localStorage.getItem(PENDING_STORAGE) || "{}"); } catch (_) { return {}; }
  }

  function setPending(update) {
    const votes = pendingVotes();
    update(votes);
    localStorage.setItem(PENDING_STORAGE, JSON.stringify(votes));
  }

  function showStatus(voteId, state, text) {
    document.querySelectorAll('[data-vote-id="' + voteId + '"] .fb-status').forEach((el) => {
      el.dataset.state = state;
      el.textContent = text;
    });
  }

  // Keep the vote (a newer version of the same vote id replaces an unsent one), then send what waits.
  function sendVote(kind, vote) {
    setPending((votes) => { votes[vote.vote_id] = { kind, vote }; });
    showStatus(vote.vote_id, "saving", "Saving…");
    return flush();
  }

  // One sender at a time, oldest vote first; what the server cannot take now is retried later.
  function flush() {
    feedback.sending = feedback.sending.then(async () => {
      for (const [voteId, { kind, vote }] of Object.entries(pendingVotes())) {
        try {
          const response = await chat.api("v1/feedback/" + kind, { method: "POST", body: JSON.stringify(vote) });
          await response.json();
          dropIfUnchanged(voteId, vote);
          showStatus(voteId, "saved", "Thanks: saved.");
        } catch (e) {
          if (e instanceof chat.Unreachable) {
            showStatus(voteId, "waiting", "Not saved yet: the server is unreachable; retrying.");
            if (!feedback.retryTimer) {
              feedback.retryTimer = setTimeout(() => { feedback.retryTimer = null; flush(); }, RETRY_MS);
            }
            return;
          }
          if (e instanceof chat.HttpError && e.status === 404) { // a server without --feedback: keep it for one with
            showStatus(voteId, "waiting", "Not saved yet: this server records no feedback now.");
            return;
          }
          dropIfUnchanged(voteId, vote); // refused as malformed: sending it again would not help
          showStatus(voteId, "error", "Not saved: " + (e.message || e));
        }
      }
    });
    return feedback.sending;
  }

  function dropIfUnchanged(voteId, sent) {
    setPending((votes) => {
      if (votes[voteId] && JSON.stringify(votes[voteId].vote) === JSON.stringify(sent)) delete votes[voteId];
    });
  }

  function answerRecord(text, served, settings) {
    return { text, model: served.model || chat.state.model || "unknown", settings: settings || {},
      sources: served.sources || [] };
  }

  // ---------------------------------------------------------------------------------------------- ratings

  // Thumbs up/down (and then a comment box) under a finished answer.
  function rateable(msgEl, answered) {
    if (!feedback.config) return;
    const voteId = randomId();
    const box = document.createElement("div");
    box.className = "feedback";
    box.dataset.voteId = voteId;
    box.innerHTML =
      '<button type="button" class="fb-thumb fb-up" aria-pressed="false" title="Good answer" ' +
      'aria-label="Good answer">' + THUMB + "</button>" +
      '<button type="button" class="fb-thumb fb-down" aria-pressed="false" title="Bad answer" ' +
      'aria-label="Bad answer">' + THUMB + "</button>" +
      '<span class="fb-status" role="status"></span>' +
      '<form class="fb-comment" hidden><textarea rows="2" maxlength="4000" aria-label="Comment" ' +
      'placeholder="What was good or wrong? (optional)"></textarea>' +
      '<button type="submit" class="ghost">Send comment</button></form>';
    msgEl.appendChild(box);
    const form = box.querySelector(".fb-comment");
    let rating = null;
    const send = () => sendVote("rating", {
      vote_id: voteId, session: sessionId(), messages: answered.messages, rating,
      answer: answerRecord(answered.text, answered, chat.generationSettings()),
      comment: form.querySelector("textarea").value.trim(),
    });
    for (const [cls, value] of [[".fb-up", "up"], [".fb-down", "down"]]) {
      box.querySelector(cls).addEventListener("click", () => {
        rating = value;
        box.querySelectorAll(".fb-thumb").forEach((b) => b.setAttribute("aria-pressed", String(b.matches(cls))));
        form.hidden = false;
        send();
      });
    }
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      if (rating) send();
    });
  }

  // ------------------------------------------------------------------------------------------ compare mode

  // The two requests of a question: how they differ is the server's choice (`serve --compare-by`).
  function variants(question) {
    const page = chat.generationSettings();
    const seed = hash32(sessionId() + "\n" + question);
    if (feedback.config.compare_by === "notes") {
      return { seed, list: [Object.assign({}, page, { probllm: { retrieve: true } }),
                            Object.assign({}, page, { probllm: { retrieve: false } })] };
    }
    const temperature = page.temperature > 0 ? page.temperature : feedback.config.compare_temperature;
    return { seed, list: [Object.assign({}, page, { temperature, seed }),
                          Object.assign({}, page, { temperature, seed: (seed + 1) >>> 0 })] };
  }

  function comparePane(n) {
    const pane = document.createElement("section");
    pane.className = "pane";
    pane.innerHTML =
      "<h3>Answer " + n + "</h3>" +
      '<div class="answer" data-state="waiting" data-chunks="0"><span class="thinking">Looking it up' +
      '<span class="dots"><i></i><i></i><i></i></span></span></div>' +
      '<section class="sources" hidden><h3>Sources</h3><ol class="source-list"></ol></section>' +
      '<p class="note" hidden></p>' +
      '<fieldset class="criteria" disabled><legend>This answer is</legend>' +
      CRITERIA.map(([name, label]) => '<label><input type="checkbox" name="' + name + '"> ' + label + "</label>")
        .join("") + "</fieldset>";
    pane.querySelector(".answer").addEventListener("click", (event) => {
      const cite = event.target.closest(".cite");
      if (cite) chat.openSource(pane, cite.dataset.n);
    });
    return pane;
  }

  // One answer streamed into its pane; resolves with what was said and by which model.
  async function streamPane(pane, messages, settings, signal) {
    const answerEl = pane.querySelector(".answer");
    const served = { model: chat.state.model, sources: [] };
    const body = Object.assign({ messages, stream: true }, settings);
    if (chat.state.model) body.model = chat.state.model;
    let text = "";
    let outcome = "done";
    try {
      const response = await chat.api("v1/chat/completions", { method: "POST", body: JSON.stringify(body), signal });
      answerEl.dataset.state = "streaming";
      for await (const event of chat.sseEvents(response)) {
        if (event.sources) { served.sources = event.sources; chat.showSources(pane, event.sources); }
        if (event.model) served.model = event.model;
        if (event.error) throw new chat.HttpError(500, event.error.message || "the server reported an error");
        const delta = event.choices && event.choices[0] && event.choices[0].delta && event.choices[0].delta.content;
        if (delta) {
          text += delta;
          chat.renderInto(answerEl, text);
        }
      }
    } catch (e) {
      outcome = e.name === "AbortError" ? "stopped" : e instanceof chat.Unreachable || e instanceof TypeError
        ? "unreachable" : "error";
      chat.setNote(pane, outcome === "stopped" ? "info" : "error", outcome === "stopped" ? "Stopped."
        : outcome === "unreachable" ? "The server could not be reached." : "The server could not answer: " + e.message);
    }
    chat.renderInto(answerEl, text);
    answerEl.dataset.state = outcome;
    return { text, served, settings, outcome };
  }

  async function askCompare(question) {
    const state = chat.state;
    chat.addUserMessage(question);
    state.turn += 1;
    const messages = chat.messagesFor(question);
    const { seed, list } = variants(question);
    const swap = seed % 2 === 1; // which variant is shown first, unlabelled
    const voteId = randomId();
    const el = document.createElement("article");
    el.className = "msg assistant compare";
    el.dataset.turn = String(state.turn);
    el.dataset.voteId = voteId;
    const panes = [comparePane(1), comparePane(2)];
    const row = document.createElement("div");
    row.className = "compare-panes";
    row.append(...panes);
    el.appendChild(row);
    document.getElementById("conversation").appendChild(el);
    const questionEl = document.getElementById("question");
    questionEl.value = "";
    chat.autoGrow();
    state.busy = true;
    state.controller = new AbortController();
    chat.updateControls();
    chat.scrollToEnd();

    const shown = swap ? [list[1], list[0]] : list;
    const results = await Promise.all(panes.map((pane, i) => streamPane(pane, messages, shown[i],
                                                                        state.controller.signal)));
    state.busy = false;
    state.controller = null;
    chat.updateControls();
    if (results.some((r) => r.outcome === "unreachable")) {
      chat.setOnline(false);
      questionEl.value = question; // kept, to ask again when the server is back
      chat.autoGrow();
      return;
    }
    if (!results.every((r) => r.text && r.outcome === "done")) return;
    // The conversation goes on with answer 1, or with the winner once the student has voted.
    const turn = [{ role: "user", content: question }, { role: "assistant", content: results[0].text }];
    state.history.push(...turn);
    addVerdictForm(el, panes, (overall) => {
      turn[1].content = results[overall === "B" ? 1 : 0].text;
    }, (overall, criteria, comment) => sendVote("comparison", {
      vote_id: voteId, session: sessionId(), messages, overall, criteria, comment,
      answers: results.map((r) => answerRecord(r.text, r.served, Object.assign({ compare_seed: seed }, r.settings))),
    }));
    chat.scrollToEnd();
    questionEl.focus();
  }

  function addVerdictForm(el, panes, onChoice, send) {
    panes.forEach((pane) => { pane.querySelector(".criteria").disabled = false; });
    const form = document.createElement("form");
    form.className = "verdict";
    form.innerHTML =
      '<fieldset class="overall"><legend>Better overall</legend>' +
      VERDICTS.map(([value, label]) => '<label><input type="radio" name="overall" value="' + value + '"> ' + label +
        "</label>").join("") + "</fieldset>" +
      '<p class="hint">Tick what holds for each answer above: if neither is ticked "correct", both count as wrong.' +
      "</p>" +
      '<textarea rows="2" maxlength="4000" aria-label="Comment" placeholder="Comment (optional)"></textarea>' +
      '<div class="verdict-actions"><button type="submit" class="primary" disabled>Send vote</button>' +
      '<span class="fb-status" role="status"></span></div>';
    el.appendChild(form);
    const submit = form.querySelector("button[type=submit]");
    form.addEventListener("change", () => {
      const picked = form.querySelector("input[name=overall]:checked");
      submit.disabled = !picked;
      if (picked) onChoice(picked.value);
    });
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const picked = form.querySelector("input[name=overall]:checked");
      if (!picked) return;
      const criteria = {};
      for (const [name] of CRITERIA) {
        const [a, b] = panes.map((pane) => pane.querySelector('input[name="' + name + '"]').checked);
        criteria[name] = a && b ? "AB" : a ? "A" : b ? "B" : "None";
      }
      send(picked.value, criteria, form.querySelector("textarea").value.trim());
      submit.textContent = "Update vote";
    });
  }

  window.ProbFeedback = { comparing, askCompare, rateable };
  loadConfig();
})();
