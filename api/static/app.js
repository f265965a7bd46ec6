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

function searchBody(extra) {
  const mode = $("#copy-mode").checked ? { mode: "copy" } : {};
  return { collection: collection(), top: Number($("#top").value) || 8, metadata: true, ...mode, ...extra };
}

function byId(id) {
  showQuery(`Indexed image ${id}`, null);
  thumbnail(id).then((url) => showQuery(`Indexed image ${id}`, url)).catch(() => {});
  return search({
    path: "/v1/search",
    options: { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(searchBody({ id })) },
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
    const image = document.createElement("img");
    image.alt = `image ${row.id}`;
    image.title = "Search by this image";
    image.addEventListener("click", () => byId(row.id));
    const caption = document.createElement("div");
    caption.className = "rank";
    caption.textContent = `#${rank + 1} · id ${row.id} · distance ${Number(row.distance).toFixed(4)}`;
    if (row.copy_score !== undefined && row.copy_score !== null) {
      caption.textContent += ` · copy ${Number(row.copy_score).toFixed(2)}`;
      if (answer.copy && answer.copy.found && answer.copy.id === row.id) item.classList.add("original");
    }
    const facts = document.createElement("dl");
    const meta = row.metadata || {};
    for (const key of ["original_file_name", "original_path", "width", "height"]) {
      if (meta[key] === undefined || meta[key] === null) continue;
      const term = document.createElement("dt");
      term.textContent = key.replace("original_", "");
      const value = document.createElement("dd");
      value.textContent = String(meta[key]);
      facts.append(term, value);
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
    showQuery(`File ${file.name}`, URL.createObjectURL(file));
    const form = new FormData();
    form.append("image", file);
    for (const [key, value] of Object.entries(searchBody({}))) form.append(key, String(value));
    search({ path: "/v1/search", options: { method: "POST", body: form } });
  });
  $("#search-url").addEventListener("submit", (event) => {
    event.preventDefault();
    showQuery(`URL ${$("#url").value.trim()}`, null);
    search({ path: "/v1/search", options: { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(searchBody({ uri: $("#url").value.trim() })) } });
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
