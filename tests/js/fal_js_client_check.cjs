// The official JS client (@fal-ai/client) against `engine serve`, pointed at it the way a user would: a
// requestMiddleware that rewrites fal's hosts, and (realtime: the client opens wss://fal.run itself) a WebSocket
// class that does the same. Prints one JSON line of findings for tests/test_server_extras.py to check.
// usage: node fal_js_client_check.cjs BASE_URL KEY   (NODE_PATH: where @fal-ai/client and ws are installed)
const { createFalClient } = require("@fal-ai/client");
const WS = require("ws");

const [base, key] = process.argv.slice(2);
const local = new URL(base);

globalThis.WebSocket = class LocalWebSocket extends WS {
  constructor(url, ...rest) {
    super(String(url).replace("wss://fal.run/", `wss://${local.host}/`), ...rest);
  }
};

const fal = createFalClient({
  credentials: key,
  requestMiddleware: async (request) => {
    const u = new URL(request.url);
    if (u.hostname === "queue.fal.run") return { ...request, url: `${base}/queue${u.pathname}${u.search}` };
    if (u.hostname === "fal.run" || u.hostname === "rest.fal.ai") return { ...request, url: `${base}${u.pathname}${u.search}` };
    return request;
  },
});

// a 16x8 green PNG
const PNG = Buffer.from(
  "iVBORw0KGgoAAAANSUhEUgAAABAAAAAICAIAAAB/FOjAAAAAFklEQVR4nGPkOiHHQApgIkn1qAYiAQB7YwEApX1bEAAAAABJRU5ErkJggg==",
  "base64");

async function main() {
  const out = {};
  // 1. subscribe in streaming mode: GET .../status/stream
  const updates = [];
  const streamed = await fal.subscribe("fal-ai/fast-sdxl", {
    input: { prompt: "js", seed: 3, image_size: { width: 64, height: 64 }, num_inference_steps: 2 },
    mode: "streaming", logs: true, onQueueUpdate: (u) => updates.push(u.status),
  });
  out.streaming = { width: streamed.data.images[0].width, updates, requestId: streamed.requestId };
  // 2. a Blob input: uploaded through the storage routes first, then replaced by its file_url
  const blob = new Blob([PNG], { type: "image/png" });
  const upscaled = await fal.run("fal-ai/aura-sr", { input: { image_url: blob, seed: 1 } });
  out.blob = { width: upscaled.data.image.width, height: upscaled.data.image.height };
  const url = await fal.storage.upload(new Blob([PNG], { type: "image/png" }));
  out.upload = { url };
  // 3. realtime: POST /tokens/ (through the middleware), then the socket with ?fal_jwt_token=
  out.realtime = await new Promise((resolve, reject) => {
    const results = [];
    const timer = setTimeout(() => reject(new Error("realtime: no answer in 120 s")), 120000);
    const connection = fal.realtime.connect("fal-ai/fast-lightning-sdxl", {
      throttleInterval: 0,
      onResult: (result) => {
        results.push({ seed: result.seed, url: result.images[0].url.slice(0, 22) });
        if (results.length === 2) {
          clearTimeout(timer);
          connection.close();
          resolve(results);
        }
      },
      onError: (error) => { clearTimeout(timer); reject(error); },
    });
    const frame = (seed) => ({ prompt: "rt", seed, image_size: { width: 64, height: 64 }, num_inference_steps: "1" });
    connection.send(frame(11));
    setTimeout(() => connection.send(frame(12)), 3000);
  });
  // 4. the same server as the client's proxyUrl: {server}/fal/proxy reads x-fal-target-url
  const proxied = createFalClient({ credentials: key, proxyUrl: { url: `${base}/fal/proxy`, when: "always" } });
  const viaProxy = await proxied.subscribe("fal-ai/fast-sdxl", {
    input: { prompt: "proxied", seed: 5, image_size: { width: 64, height: 64 }, num_inference_steps: 1 },
    pollInterval: 100,
  });
  out.proxy = { seed: viaProxy.data.seed, url: viaProxy.data.images[0].url.slice(0, base.length + 7) };
  console.log(JSON.stringify(out));
}

main().then(() => process.exit(0), (e) => { console.error("FAILED", e && (e.stack || JSON.stringify(e))); process.exit(1); });
