// The search page: plain DOM, no framework, no CDN. Every value from the server is set as text,
// never as HTML (file names and metadata come from whoever indexed the images).
"use strict";

const $ = (selector) => document.querySelector(selector);
const thumbnails = new Map(); // image id -> object URL of its fetched thumbnail

function collection() {
  return $("#collection").value.trim() || "default";
}

function headers(extra = {}) {
  const token = $("#token").value.trim();
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

function say(text, isError = false) {
  const status = $("#status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  const body = (response.headers.get("Content-Type") || "").includes("json") ? await response.json() : null;
  if (!response.ok) {
    const error = body && body.error ? `${body.error.code}: ${body.error.message}` : response.statusText;
    throw new Error(`${response.status} ${error}`);
  }
  return body;
}

// What the results answer, shown above them: a thumbnail (a local file's, or an indexed image's) and a name.
function showQuery(label, thumbnailUrl) {
  const image = $("#query-shown img");
  image.hidden = !thumbnailUrl;
  if (thumbnailUrl) image.src = thumbnailUrl; else image.removeAttribute("src");
  $("#query-shown span").textContent = label;
  $("#query-shown").hidden = false;
}

async function search(request) {
  say("Searching…");
  $("#results").replaceChildren();
  try {
    const answer = await api(request.path, request.options);
    show(answer);
  } catch (error) {
    say(`Search failed: ${error.message}`, true);
  }
}

// The filter box: a JSON filter ({"price": {"lt": 100}}), or name=value pairs separated by spaces or
// commas (all must hold). A value reads as JSON when it is a number, true/false or a quoted string.
function parseFilter(text) {
  text = text.trim();
  if (!text) return null;
  if (text.startsWith("{")) {
    let filter;
    try { filter = JSON.parse(text); } catch (error) { throw new Error("the filter is not valid JSON"); }
    if (!filter || typeof filter !== "object" || Array.isArray(filter)) throw new Error("the filter is a JSON object");
    return filter;
  }
  const filter = {};
  for (const pair of text.split(/[\s,]+/).filter(Boolean)) {
    const at = pair.indexOf("=");
    if (at < 1) throw new Error(`"${pair}" is not name=value`);
    const raw = pair.slice(at + 1);
    let value = raw;
    try {
      const parsed = JSON.parse(raw);
      if (["number", "boolean", "string"].includes(typeof parsed)) value = parsed;
    } catch (error) { /* plain text */ }
    filter[pair.slice(0, at)] = value;
  }
  return filter;
}

function searchBody(extra) {
  const mode = $("#copy-mode").checked ? { mode: "copy" } : {};
  const filter = parseFilter($("#filter").value);  // throws with the reason: the caller says it
  return { collection: collection(), top: Number($("#top").value) || 8, metadata: true, ...mode,
    ...(filter ? { filter } : {}), ...extra };
}

// What a query is, with the filter it ran under.
function described(label) {
  const text = $("#filter").value.trim();
  return text ? `${label} · where ${text}` : label;
}

function byId(id, key) {
  let body;
  try { body = searchBody({ id }); } catch (error) { return say(`Bad filter: ${error.message}`, true); }
  const label = described(key ? `Indexed image ${id} (key ${key})` : `Indexed image ${id}`);
  showQuery(label, null);
  thumbnail(id).then((url) => showQuery(label, url)).catch(() => {});
  return search({
    path: "/v1/search",
    options: { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) },
  });
}

function show(answer) {
  const rows = answer.results || [];
  let verdict = "";
  if (answer.copy) {
    verdict = answer.copy.found
      ? ` · its original: image ${answer.copy.id} (score ${Number(answer.copy.score).toFixed(2)})`
      : " · no verified original: the most similar images";
  }
  say(`${rows.length} results of ${answer.count} images in ${answer.took_ms} ms${verdict}`);
  const list = $("#results");
  for (const [rank, row] of rows.entries()) {
    const item = document.createElement("li");
    item.dataset.id = row.id;
    const meta = row.metadata || {};
    const key = row.key ?? meta.key;
    if (key !== undefined && key !== null) item.dataset.key = key;
    const image = document.createElement("img");
    image.alt = `image ${row.id}`;
    image.title = "Search by this image";
    image.addEventListener("click", () => byId(row.id, key));
    const caption = document.createElement("div");
    caption.className = "rank";
    caption.textContent = `#${rank + 1} · id ${row.id} · distance ${Number(row.distance).toFixed(4)}`;
    if (row.copy_score !== undefined && row.copy_score !== null) {
      caption.textContent += ` · copy ${Number(row.copy_score).toFixed(2)}`;
      if (answer.copy && answer.copy.found && answer.copy.id === row.id) item.classList.add("original");
    }
    const facts = document.createElement("dl");
    const fact = (name, value, className) => {
      const term = document.createElement("dt");
      term.textContent = name;
      const text = document.createElement("dd");
      text.textContent = Array.isArray(value) ? value.join(", ") : String(value);
      if (className) { term.className = className; text.className = className; }
      facts.append(term, text);
    };
    if (key !== undefined && key !== null) fact("key", key, "key");
    for (const [name, value] of Object.entries(meta.attributes || {})) fact(name, value, "attribute");
    for (const name of ["original_file_name", "original_path", "width", "height"]) {
      if (meta[name] === undefined || meta[name] === null) continue;
      fact(name.replace("original_", ""), meta[name]);
    }
    item.append(image, caption, facts);
    list.append(item);
    thumbnail(row.id).then((url) => { image.src = url; }).catch(() => { image.alt = "no thumbnail"; });
  }
}

async function thumbnail(id) {
  const key = `${collection()}/${id}`;
  if (thumbnails.has(key)) return thumbnails.get(key);
  const response = await fetch(`/v1/images/${id}/file?collection=${encodeURIComponent(collection())}`,
    { headers: headers() });
  if (!response.ok) throw new Error(String(response.status));
  const url = URL.createObjectURL(await response.blob());
  thumbnails.set(key, url);
  return url;
}

async function refreshJobs() {
  let answer;
  try {
    answer = await api(`/v1/jobs?limit=10&collection=${encodeURIComponent(collection())}`);
  } catch (error) {
    return; // no token yet, or the API is down: the search status line says why on use
  }
  const rows = answer.jobs.map((job) => {
    const row = document.createElement("tr");
    row.dataset.job = job.job_id;
    const done = (job.indexed || 0) + (job.duplicate || 0) + (job.failed || 0);
    const bar = document.createElement("progress");
    bar.max = job.total || 1;
    bar.value = job.state === "done" ? bar.max : done;
    const started = job.created_at ? new Date(job.created_at * 1000).toLocaleTimeString() : "";
    const cells = [job.job_id.slice(0, 8), job.error ? `${job.state}: ${job.error}` : job.state, bar,
      job.indexed || 0, job.duplicate || 0, job.failed || 0, started];
    for (const value of cells) {
      const cell = document.createElement("td");
      if (value instanceof Node) cell.append(value); else cell.textContent = String(value);
      row.append(cell);
    }
    return row;
  });
  $("#jobs tbody").replaceChildren(...rows);
}

async function index(options) {
  try {
    const accepted = await api("/v1/index", { method: "POST", ...options });
    say(`Job ${accepted.job_id.slice(0, 8)} queued`);
    refreshJobs();
  } catch (error) {
    say(`Indexing failed: ${error.message}`, true);
  }
}

function start() {
  $("#token").value = sessionStorage.getItem("pupyl-token") || "";
  $("#token").addEventListener("change", () => {
    sessionStorage.setItem("pupyl-token", $("#token").value.trim());
    refreshJobs();
  });
  $("#collection").addEventListener("change", refreshJobs);
  $("#settings").addEventListener("submit", (event) => event.preventDefault());

  $("#search-file").addEventListener("submit", (event) => {
    event.preventDefault();
    const file = $("#file").files[0];
    if (!file) return say("Choose an image first", true);
    let body;
    try { body = searchBody({}); } catch (error) { return say(`Bad filter: ${error.message}`, true); }
    showQuery(described(`File ${file.name}`), URL.createObjectURL(file));
    const form = new FormData();
    form.append("image", file);
    for (const [key, value] of Object.entries(body)) {
      form.append(key, typeof value === "object" ? JSON.stringify(value) : String(value));
    }
    search({ path: "/v1/search", options: { method: "POST", body: form } });
  });
  $("#search-url").addEventListener("submit", (event) => {
    event.preventDefault();
    let body;
    try { body = searchBody({ uri: $("#url").value.trim() }); } catch (error) {
      return say(`Bad filter: ${error.message}`, true);
    }
    showQuery(described(`URL ${$("#url").value.trim()}`), null);
    search({ path: "/v1/search", options: { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body) } });
  });
  $("#index-files").addEventListener("submit", (event) => {
    event.preventDefault();
    const files = $("#index-input").files;
    if (!files.length) return say("Choose images to index first", true);
    const form = new FormData();
    for (const file of files) form.append("files", file, file.name);
    form.append("collection", collection());
    form.append("check_unique", String($("#unique").checked));
    index({ body: form });
  });
  $("#index-url").addEventListener("submit", (event) => {
    event.preventDefault();
    index({ headers: { "Content-Type": "application/json" }, body: JSON.stringify(
      { uri: $("#index-uri").value.trim(), collection: collection(), check_unique: $("#unique").checked }) });
  });
  refreshJobs();
  setInterval(refreshJobs, 2000);
}

document.addEventListener("DOMContentLoaded", start);
