// Talking to ddim-serve from the page: requests carrying the API key, event streams read from fetch() (EventSource
// cannot POST), the server's errors put in words, and base64 .npy arrays.

export const settings = { apiKey: "" };

const SUMMARY = {
  400: "The request was not understood", 404: "Not found", 406: "The server cannot answer in this format",
  409: "Not available", 413: "Too large", 422: "Please check the form", 429: "The server is busy",
  500: "The server failed", 503: "The server is not ready", 504: "It took too long",
};
const LABELS = {
  steps: "S (steps)", eta: "η (eta)", n: "n (images)", seed: "Seed", preview_every: "Preview every",
  guidance_scale: "Guidance", class_label: "Class", schedule: "Schedule", model: "Model", frames: "Frames",
  method: "Method", images: "Image", "images.0": "Image", "start.seed": "Start seed", "end.seed": "End seed",
  "start.image": "Start image", "end.image": "End image", start: "Start", end: "End", prompt: "Prompt",
  negative_prompt: "Negative prompt", width: "Width", height: "Height", strength: "Strength",
  source_class_label: "Source class", source_prompt: "Source prompt",
};

export class ApiError extends Error {
  constructor(message, { status = 0, cancelled = false } = {}) {
    super(message);
    this.status = status;
    this.cancelled = cancelled;
  }
}

/** The server's detail (a string, or a list of {field, msg}) in words, led by what the status means. */
export function inWords(status, detail, retryAfter) {
  let text;
  if (Array.isArray(detail)) {
    text = detail.map((d) => (d && d.field ? `${LABELS[d.field] || d.field}: ${d.msg}` : (d && d.msg) || String(d)))
      .join("; ");
  } else {
    text = typeof detail === "string" ? detail : JSON.stringify(detail);
  }
  const summary = SUMMARY[status] || (status >= 500 ? "The server failed" : "The server refused the request");
  const later = retryAfter ? ` Try again in ${retryAfter} s.` : "";
  return `${summary}: ${text}${later}`;
}

function headers(extra) {
  const out = { ...extra };
  const key = settings.apiKey.trim();
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

/** fetch() with the API key; an error answer throws an ApiError in words. */
export async function send(path, { method = "GET", json, accept = "application/json", signal } = {}) {
  const extra = { Accept: accept };
  if (json !== undefined) extra["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers: headers(extra), signal,
      body: json === undefined ? undefined : JSON.stringify(json) });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(`Cannot reach the server (${e.message}). Is it running?`);
  }
  if (!response.ok) {
    const raw = await response.text();
    let detail = raw || response.statusText;
    try { detail = JSON.parse(raw).detail; } catch { /* not JSON: the text is the detail */ }
    throw new ApiError(inWords(response.status, detail, response.headers.get("Retry-After")),
      { status: response.status });
  }
  return response;
}

export async function getJSON(path) {
  return (await send(path)).json();
}

function parseEvent(block) {
  let kind = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) kind = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trim());
  }
  return data.length ? { kind, data: JSON.parse(data.join("\n")) } : null;
}

/** POST path with Accept: text/event-stream; onProgress({step, steps, preview?}) per progress event; resolves
 * with the result (the endpoint's JSON answer), throws an ApiError on an error or cancelled event. */
export async function stream(path, body, { signal, onProgress }) {
  const response = await send(path, { method: "POST", json: body, accept: "text/event-stream", signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replaceAll("\r\n", "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = parseEvent(buffer.slice(0, cut));
      buffer = buffer.slice(cut + 2);
      if (!event) continue;
      if (event.kind === "progress") onProgress(event.data);
      else if (event.kind === "result") { reader.cancel(); return event.data; }
      else if (event.kind === "cancelled") throw new ApiError("Cancelled.", { cancelled: true });
      else throw new ApiError(inWords(event.data.status, event.data.detail), { status: event.data.status });
    }
  }
  throw new ApiError("The server closed the stream before the result came.");
}

export function base64Bytes(b64) {
  const text = atob(b64);
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
  return bytes;
}

/** A base64 .npy (little-endian float32, C order) as {shape, data: Float32Array}. */
export function parseNpy(b64) {
  const bytes = base64Bytes(b64);
  const magic = String.fromCharCode(...bytes.subarray(1, 6));
  if (bytes[0] !== 0x93 || magic !== "NUMPY") throw new Error("not a .npy array");
  const view = new DataView(bytes.buffer);
  const [lengthAt, start] = bytes[6] === 1 ? [view.getUint16(8, true), 10] : [view.getUint32(8, true), 12];
  const header = new TextDecoder("latin1").decode(bytes.subarray(start, start + lengthAt));
  const descr = /'descr':\s*'([^']+)'/.exec(header);
  if (!descr || descr[1] !== "<f4" || /'fortran_order':\s*True/.test(header)) {
    throw new Error(`unsupported .npy header ${header.trim()}`);
  }
  const shape = /'shape':\s*\(([^)]*)\)/.exec(header)[1].split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  const count = shape.reduce((a, b) => a * b, 1);
  const offset = start + lengthAt;
  return { shape, data: new Float32Array(bytes.buffer.slice(offset, offset + 4 * count)) };
}

/** Mean and standard deviation (population), summed in float64. */
export function meanStd(data) {
  let sum = 0;
  for (const v of data) sum += v;
  const mean = sum / data.length;
  let squares = 0;
  for (const v of data) squares += (v - mean) ** 2;
  return { mean, std: Math.sqrt(squares / data.length) };
}
