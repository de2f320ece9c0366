// The stages side by side: the same held-out prompts answered by every stage's export. Every model string
// goes into the page with textContent, never as markup.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

const percent = (x) => `${(100 * x).toFixed(0)}%`;
const number = (x) => (x === null || x === undefined ? "–" : x.toFixed(2));

function render(data) {
  $("about").textContent = `${data.prompts.length} held-out prompts · ${data.stages.length} stages` +
    (data.max_new_tokens ? ` · at most ${data.max_new_tokens} new tokens` : "");
  $("score-head").textContent = `mean ${data.score_name} score`;
  const body = $("summary").querySelector("tbody");
  for (const stage of data.stages) {
    const s = data.summary[stage];
    const row = el("tr");
    row.dataset.stage = stage;
    for (const cell of [stage, s.mean_tokens.toFixed(1), percent(s.stopped), percent(s.format_ok), number(s.mean_score)]) {
      row.append(el("td", "", cell));
    }
    body.append(row);
  }
  const prompts = $("prompts");
  data.prompts.forEach((prompt, i) => {
    const block = el("section", "question");
    block.append(el("div", "turn", prompt));
    const grid = el("div", "answers");
    for (const stage of data.stages) {
      const answer = data.answers[stage][i];
      const card = el("article", "answer" + (answer.stopped && answer.format_ok ? "" : " bad"));
      card.dataset.stage = stage;
      const meta = [`${answer.tokens} tokens`, answer.stopped ? "stopped" : "did not stop",
                    answer.format_ok ? "format ok" : "format broken"];
      if (answer.score !== null && answer.score !== undefined) meta.push(`${data.score_name} ${answer.score.toFixed(2)}`);
      card.append(el("div", "stage", stage), el("div", "text", answer.response), el("div", "meta", meta.join(" · ")));
      grid.append(card);
    }
    block.append(grid);
    prompts.append(block);
  });
}

document.addEventListener("DOMContentLoaded", async () => {
  try {
    const response = await fetch("/api/compare", { credentials: "same-origin" });
    const data = await response.json();
    if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
    render(data);
  } catch (err) {
    $("status").textContent = err.message;
    $("status").classList.add("error");
  }
});
