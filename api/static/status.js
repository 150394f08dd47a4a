// The status page: polls v1/status and draws batches, tokens/s, workers and queue depth.
// Everything from the server is set as text (never as HTML): batch and model names come from users.
"use strict";

(() => {
  const KEY = "diffbatch.apiKey";
  const POINTS = 90; // tokens/s readings the chart keeps
  const every = Math.max(250, Number(new URLSearchParams(location.search).get("poll")) || 2000);
  const rates = [];
  let previous = null; // the last poll: {at: ms, tokens: Map(batch id -> tokens_done)}

  const $ = (id) => document.getElementById(id);

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function row(cells) {
    const tr = document.createElement("tr");
    for (const cell of cells) tr.append(cell instanceof Node ? wrap(cell) : el("td", "", String(cell)));
    return tr;
  }

  function wrap(node) {
    if (node.tagName === "TD") return node;
    const td = document.createElement("td");
    td.append(node);
    return td;
  }

  const number = (n) => Math.round(n).toLocaleString("en-US");

  function clock(seconds) {
    if (seconds === null || seconds === undefined) return "-";
    const s = Math.max(0, Math.round(seconds));
    const pad = (n) => String(n).padStart(2, "0");
    return `${Math.floor(s / 3600)}:${pad(Math.floor(s / 60) % 60)}:${pad(s % 60)}`;
  }

  function age(seconds) {
    if (seconds < 60) return `${seconds} s ago`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
    return `${Math.floor(seconds / 86400)} d ago`;
  }

  function showError(message) {
    $("error").textContent = message;
    $("error").hidden = !message;
  }

  // Tokens/s between two polls: the growth of every batch seen in both (a batch that left the list is
  // not counted as negative).
  function measure(data) {
    const at = performance.now();
    const tokens = new Map(data.batches.map((b) => [b.id, b.tokens_done]));
    if (previous && at > previous.at) {
      let grown = 0;
      for (const [id, n] of tokens) {
        if (previous.tokens.has(id)) grown += Math.max(0, n - previous.tokens.get(id));
      }
      rates.push(grown / ((at - previous.at) / 1000));
      if (rates.length > POINTS) rates.shift();
    }
    previous = {at, tokens};
  }

  function drawChart() {
    const svg = $("chart");
    const ns = "http://www.w3.org/2000/svg";
    const [width, height, top] = [640, 140, 16];
    svg.replaceChildren();
    const peak = Math.max(1, ...rates);
    const x = (i) => (rates.length < 2 ? 0 : (i * width) / (POINTS - 1));
    const y = (r) => height - 2 - ((height - top - 2) * r) / peak;
    const grid = document.createElementNS(ns, "line");
    for (const [name, value] of Object.entries({x1: 0, x2: width, y1: y(peak), y2: y(peak), class: "grid"})) {
      grid.setAttribute(name, value);
    }
    $("chart-peak").textContent = `(dashed line: ${number(peak)} tok/s)`;
    svg.append(grid);
    if (rates.length) {
      const points = rates.map((r, i) => `${x(i).toFixed(1)},${y(r).toFixed(1)}`);
      const area = document.createElementNS(ns, "polygon");
      area.setAttribute("points", `0,${height} ${points.join(" ")} ${x(rates.length - 1).toFixed(1)},${height}`);
      area.setAttribute("class", "area");
      const line = document.createElementNS(ns, "polyline");
      line.setAttribute("points", points.join(" "));
      line.setAttribute("class", "line");
      svg.append(area, line);
    }
  }

  function progressCell(batch) {
    const counts = batch.request_counts;
    const done = counts.completed + counts.failed;
    const bar = el("div", "bar");
    const fill = el("div", `fill ${batch.status}`);
    fill.style.width = `${(100 * Math.min(1, batch.progress)).toFixed(1)}%`;
    bar.append(fill);
    const label = `${number(done)} / ${counts.total ? number(counts.total) : "?"} requests`;
    const tokens = batch.tokens_done ? ` · ${number(batch.tokens_done)} tokens` : "";
    const failed = counts.failed ? ` · ${number(counts.failed)} failed` : "";
    const cell = el("td", "progress");
    cell.append(bar, el("span", "", label + tokens + failed));
    return cell;
  }

  function drawBatches(data) {
    const body = $("batches").tBodies[0];
    $("batches").classList.toggle("all", data.scope === "all");
    body.replaceChildren(...data.batches.map((b) => {
      const ended = b.ended_at !== null;
      const tr = row([el("code", "", b.id), el("td", "tenant", b.tenant_id), b.model || "-",
        el("span", `badge ${b.status}`, b.status.replace("_", " ")), progressCell(b),
        ended ? "-" : clock(b.eta_s), age(Math.max(0, data.now - b.created_at))]);
      Object.assign(tr.dataset, {batchId: b.id, status: b.status, requestsTotal: b.request_counts.total,
        requestsDone: b.request_counts.completed + b.request_counts.failed, tokensDone: b.tokens_done});
      return tr;
    }));
    $("no-batches").hidden = data.batches.length > 0;
  }

  function drawWorkers(data) {
    $("workers").tBodies[0].replaceChildren(...data.workers.map((w) => {
      const name = el("td");
      name.append(el("span", w.live ? "dot live" : "dot dead"), el("code", "", w.name));
      return row([name, w.model, age(w.heartbeat_age_s)]);
    }));
    $("no-workers").hidden = data.workers.length > 0;
    $("queues").tBodies[0].replaceChildren(...data.queues.map((q) => row([q.model, number(q.pending), number(q.running)])));
    $("no-queues").hidden = data.queues.length > 0;
  }

  function render(data) {
    measure(data);
    $("scope").textContent = data.scope === "all" ? "every tenant (admin key)" : `tenant ${data.tenant_id}`;
    $("updated").textContent = `updated ${new Date(data.now * 1000).toLocaleTimeString()}`;
    $("rate").textContent = rates.length ? number(rates[rates.length - 1]) : "-";
    $("unfinished").textContent = number(data.batches.filter((b) => b.ended_at === null).length);
    $("queued").textContent = number(data.queues.reduce((sum, q) => sum + q.pending, 0));
    $("live-workers").textContent = `${data.workers.filter((w) => w.live).length} / ${data.workers.length}`;
    drawChart();
    drawBatches(data);
    drawWorkers(data);
    $("main").hidden = false;
  }

  function askForKey(message) {
    $("main").hidden = true;
    $("key-form").hidden = false;
    $("key-error").textContent = message || "";
    $("key").focus();
  }

  async function poll() {
    const key = sessionStorage.getItem(KEY);
    $("forget-key").hidden = !key;
    let response;
    try {
      response = await fetch("v1/status", {headers: key ? {Authorization: `Bearer ${key}`} : {}, cache: "no-store"});
    } catch (error) {
      showError(`The server did not answer (${error.message}); trying again.`);
      return setTimeout(poll, every);
    }
    const body = await response.json().catch(() => null);
    const message = body && body.error ? body.error.message : `HTTP ${response.status}`;
    if (response.status === 401) {
      showError("");
      return askForKey(key ? message : ""); // polling resumes once a key is given
    }
    if (!response.ok) {
      showError(`${message}; trying again.`);
    } else {
      showError("");
      render(body);
    }
    setTimeout(poll, every);
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("key").value.trim());
    $("key").value = "";
    $("key-form").hidden = true;
    poll();
  });
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    location.reload();
  });
  poll();
})();
