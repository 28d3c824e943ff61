// The ppx-serve web page: microphone -> Opus (WebCodecs) -> Ogg pages -> websocket /api/chat,
// and back: Ogg pages -> Opus packets -> AudioDecoder -> AudioContext. No libraries, no build.
"use strict";

const RATE = 24000;                       // the model's rate; Opus in both directions is 24 kHz mono
const JITTER = 0.12;                      // seconds of received audio buffered before playing
const MAX_AHEAD = 1.0;                    // playback this far behind real time is dropped and restarted
const KIND = { HANDSHAKE: 0, AUDIO: 1, TEXT: 2, ERROR: 5, PING: 6 };
// The encoder's lookahead, in 48 kHz samples (RFC 7845): libopus at 24 kHz has 6.5 ms. (Chromium's
// own OpusHead in the encoder's decoderConfig says 156, the same lookahead counted at 24 kHz.)
const PRE_SKIP = 312;
const $ = (id) => document.getElementById(id);

// Counters for people and tests (read with window.ppxStats in the console).
const stats = window.ppxStats = {
  state: "idle", error: null, sentPackets: 0, sentBytes: 0, receivedBytes: 0,
  receivedPackets: 0, decodedSeconds: 0, playedBuffers: 0, textPieces: 0,
};

// ------------------------------------------------------------------------------------------
// Ogg (RFC 3533) with Opus (RFC 7845)

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let r = i << 24;
    for (let k = 0; k < 8; k++) r = r & 0x80000000 ? (r << 1) ^ 0x04c11db7 : r << 1;
    t[i] = r >>> 0;
  }
  return t;
})();

// Ogg's CRC-32: polynomial 0x04C11DB7, MSB first, initial value 0, no final xor.
function oggCrc(bytes) {
  let c = 0;
  for (let i = 0; i < bytes.length; i++) c = ((c << 8) ^ CRC_TABLE[(c >>> 24) ^ bytes[i]]) >>> 0;
  return c;
}

const ascii = (s) => new TextEncoder().encode(s);

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

// Writes one packet per page: the OpusHead page (BOS), the OpusTags page, then the audio.
class OggWriter {
  constructor() {
    this.serial = crypto.getRandomValues(new Uint32Array(1))[0];
    this.seq = 0;
    this.granule = 0;   // 48 kHz samples of the packets written so far
  }

  page(packet, granule, flags) {
    const nseg = Math.floor(packet.length / 255) + 1;   // an Opus packet is far below 255 * 255 bytes
    const page = new Uint8Array(27 + nseg + packet.length);
    const v = new DataView(page.buffer);
    page.set(ascii("OggS"));
    v.setUint8(5, flags);                                // 1 continued, 2 BOS, 4 EOS
    v.setBigInt64(6, BigInt(granule), true);
    v.setUint32(14, this.serial, true);
    v.setUint32(18, this.seq, true);
    v.setUint8(26, nseg);
    page.fill(255, 27, 27 + nseg - 1);
    page[27 + nseg - 1] = packet.length % 255;
    page.set(packet, 27 + nseg);
    v.setUint32(22, oggCrc(page), true);                 // computed with the CRC field still zero
    this.seq = (this.seq + 1) >>> 0;
    return page;
  }

  headers(preSkip) {
    const head = new Uint8Array(19);
    const v = new DataView(head.buffer);
    head.set(ascii("OpusHead"));
    v.setUint8(8, 1);                                    // version
    v.setUint8(9, 1);                                    // channels
    v.setUint16(10, preSkip, true);
    v.setUint32(12, RATE, true);                         // input rate (informational)
    // output gain 0, mapping family 0
    const vendor = ascii("ppx web page (WebCodecs)");
    const tags = new Uint8Array(8 + 4 + vendor.length + 4);
    tags.set(ascii("OpusTags"));
    new DataView(tags.buffer).setUint32(8, vendor.length, true);
    tags.set(vendor, 12);                                // then 0 user comments
    return concat(this.page(head, 0, 2), this.page(tags, 0, 0));
  }

  audio(packet, samples48k) {
    this.granule += samples48k;
    return this.page(packet, this.granule, 0);
  }
}

// Reads an Ogg byte stream fed in any chunking and calls onPacket for every complete packet.
class OggReader {
  constructor(onPacket) {
    this.buf = new Uint8Array(0);
    this.parts = [];                                     // segments of a packet that goes on
    this.onPacket = onPacket;
  }

  push(bytes) {
    this.buf = this.buf.length ? concat(this.buf, bytes) : bytes;
    let at = 0;
    for (;;) {
      const b = this.buf;
      if (b.length - at < 27) break;
      if (b[at] !== 0x4f || b[at + 1] !== 0x67 || b[at + 2] !== 0x67 || b[at + 3] !== 0x53) {
        throw new Error("the server's audio stream is not Ogg");
      }
      const nseg = b[at + 26];
      if (b.length - at < 27 + nseg) break;
      const lacing = b.subarray(at + 27, at + 27 + nseg);
      const size = 27 + nseg + lacing.reduce((n, x) => n + x, 0);
      if (b.length - at < size) break;
      if (!(b[at + 5] & 1)) this.parts = [];             // not continued: drop any unfinished packet
      let pos = at + 27 + nseg;
      for (const n of lacing) {
        this.parts.push(b.subarray(pos, pos + n));
        pos += n;
        if (n < 255) { this.onPacket(concat(...this.parts)); this.parts = []; }
      }
      at += size;
    }
    this.buf = this.buf.slice(at);
  }
}

// ------------------------------------------------------------------------------------------
// A session

// Captures 20 ms blocks of the microphone on the audio thread.
const CAPTURE_WORKLET = `
const BLOCK = ${RATE / 50};
class Capture extends AudioWorkletProcessor {
  constructor() { super(); this.buf = new Float32Array(BLOCK); this.n = 0; }
  process(inputs) {
    const ch = inputs[0] && inputs[0][0];
    if (ch) for (let i = 0; i < ch.length; i++) {
      this.buf[this.n++] = ch[i];
      if (this.n === BLOCK) {
        this.port.postMessage(this.buf, [this.buf.buffer]);   // hands the block over, no copy
        this.buf = new Float32Array(BLOCK);
        this.n = 0;
      }
    }
    return true;
  }
}
registerProcessor("ppx-capture", Capture);`;

let session = null;

class Session {
  constructor(url) {
    this.closed = false;
    this.ctx = new AudioContext({ sampleRate: RATE, latencyHint: "interactive" });
    this.out = this.ctx.createAnalyser();               // everything played goes through here
    this.out.fftSize = 1024;
    this.out.connect(this.ctx.destination);
    this.micLevel = null;
    this.playAt = 0;
    this.writer = new OggWriter();
    this.reader = new OggReader((p) => this.onPacket(p));
    this.packets = 0;                                    // received, including the two headers
    this.decoder = null;
    this.encoder = null;
    this.stream = null;
    this.line = null;
    setState("connecting", "Connecting…");
    this.ws = new WebSocket(url);
    this.ws.binaryType = "arraybuffer";
    this.opened = false;
    this.ws.onopen = () => {
      this.opened = true;
      setState("prompt", "Prompt phase: the model is reading its voice and role prompts…");
    };
    this.ws.onmessage = (e) => this.onMessage(new Uint8Array(e.data));
    this.ws.onclose = async (e) => {
      const refused = !this.opened && e.code === 1006 && await refusal(url);
      this.close(refused || e.reason || closeReason(e.code), e.code);
    };
    this.meter();
  }

  onMessage(msg) {
    if (!(msg instanceof Uint8Array) || !msg.length) return;
    const body = msg.subarray(1);
    switch (msg[0]) {
      case KIND.HANDSHAKE:
        this.startMic().catch((e) => this.fail(`microphone: ${e.message || e}`));
        break;
      case KIND.AUDIO:
        stats.receivedBytes += body.length;
        try { this.reader.push(body); } catch (e) { this.fail(e.message); }
        break;
      case KIND.TEXT:
        stats.textPieces++;
        this.text(new TextDecoder().decode(body));
        break;
      case KIND.ERROR:
        showError(new TextDecoder().decode(body));
        break;
      default:                                           // ping and anything newer
        break;
    }
  }

  async startMic() {
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    if (this.closed) { this.stopMic(); return; }
    const src = this.ctx.createMediaStreamSource(this.stream);
    this.micLevel = this.ctx.createAnalyser();
    this.micLevel.fftSize = 1024;
    src.connect(this.micLevel);
    const url = URL.createObjectURL(new Blob([CAPTURE_WORKLET], { type: "text/javascript" }));
    await this.ctx.audioWorklet.addModule(url);
    URL.revokeObjectURL(url);
    if (this.closed) return;
    this.encoder = new AudioEncoder({ output: (c) => this.onEncoded(c),
                                      error: (e) => this.fail(`encoder: ${e.message}`) });
    this.encoder.configure({ codec: "opus", sampleRate: RATE, numberOfChannels: 1, bitrate: 32000,
                             opus: { frameDuration: 20000 } });
    this.capture = new AudioWorkletNode(this.ctx, "ppx-capture", { numberOfOutputs: 0 });
    let t = 0;
    this.capture.port.onmessage = (e) => {
      if (this.encoder?.state !== "configured") return;
      const data = new AudioData({ format: "f32-planar", sampleRate: RATE, numberOfFrames: e.data.length,
                                   numberOfChannels: 1, timestamp: Math.round(t * 1e6 / RATE), data: e.data });
      t += e.data.length;
      this.encoder.encode(data);
      data.close();
    };
    src.connect(this.capture);
    setState("live", "Live: speak whenever you like");
  }

  onEncoded(chunk) {
    const headers = this.writer.seq === 0 ? this.writer.headers(PRE_SKIP) : new Uint8Array(0);
    const packet = new Uint8Array(chunk.byteLength);
    chunk.copyTo(packet);
    const samples = Math.round((chunk.duration ?? 20000) * 48000 / 1e6);
    this.send(concat(headers, this.writer.audio(packet, samples)));
    stats.sentPackets++;
  }

  send(bytes) {
    if (this.ws.readyState !== WebSocket.OPEN) return;
    const msg = new Uint8Array(bytes.length + 1);
    msg[0] = KIND.AUDIO;
    msg.set(bytes, 1);
    this.ws.send(msg);
    stats.sentBytes += msg.length;
  }

  onPacket(packet) {
    const index = this.packets++;
    if (index === 0) {                                   // OpusHead: the decoder's description
      this.decoder = new AudioDecoder({ output: (d) => this.play(d),
                                        error: (e) => this.fail(`decoder: ${e.message}`) });
      this.decoder.configure({ codec: "opus", sampleRate: RATE, numberOfChannels: packet[9] || 1,
                               description: packet });
      return;
    }
    if (index === 1 || !packet.length || this.decoder?.state !== "configured") return;   // OpusTags
    stats.receivedPackets++;
    this.decoder.decode(new EncodedAudioChunk({ type: "key", timestamp: (index - 2) * 20000, data: packet }));
  }

  play(data) {
    const n = data.numberOfFrames;
    const buf = this.ctx.createBuffer(1, n, data.sampleRate);
    const pcm = new Float32Array(n);
    data.copyTo(pcm, { planeIndex: 0, format: "f32-planar" });
    data.close();
    buf.copyToChannel(pcm, 0);
    stats.decodedSeconds += buf.duration;
    const now = this.ctx.currentTime;
    if (this.playAt < now + 0.01 || this.playAt > now + MAX_AHEAD) this.playAt = now + JITTER;
    const src = this.ctx.createBufferSource();
    src.buffer = buf;
    src.connect(this.out);
    src.onended = () => { stats.playedBuffers++; };
    src.start(this.playAt);
    this.playAt += buf.duration;
  }

  text(piece) {
    if (!this.line) {
      this.line = document.createElement("p");
      $("transcript").append(this.line);
      piece = piece.trimStart();
    }
    this.line.textContent += piece;
    const t = $("transcript");
    t.scrollTop = t.scrollHeight;
  }

  meter() {
    const rms = (an) => {
      if (!an) return 0;
      const a = new Float32Array(an.fftSize);
      an.getFloatTimeDomainData(a);
      return Math.sqrt(a.reduce((s, x) => s + x * x, 0) / a.length);
    };
    const tick = () => {
      if (this.closed) return;
      const mic = Math.min(1, 4 * rms(this.micLevel)), agent = Math.min(1, 4 * rms(this.out));
      $("mic-level").value = mic;
      $("agent-level").value = agent;
      $("speaking").classList.toggle("on", agent > 0.02);
      requestAnimationFrame(tick);
    };
    requestAnimationFrame(tick);
  }

  fail(message) {
    showError(message);
    if (this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000, "client error");
    this.close(message);
  }

  stopMic() {
    this.stream?.getTracks().forEach((t) => t.stop());
    this.stream = null;
  }

  close(reason, code) {
    if (this.closed) return;
    this.closed = true;
    this.stopMic();
    for (const c of [this.encoder, this.decoder]) if (c && c.state !== "closed") c.close();
    this.ctx.close();
    if (this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000, "bye");
    $("mic-level").value = $("agent-level").value = 0;
    $("speaking").classList.remove("on");
    const shown = stats.error && reason && stats.error.startsWith(reason);   // the 0x05 message says it all
    setState("closed", `Closed${code ? ` (${code})` : ""}${shown ? "" : `: ${reason}`}`);
    setBusy(false);
    if (session === this) session = null;
  }
}

// Browsers hide why a websocket upgrade was refused (a 401 for a wrong API key, a 503): ask again.
async function refusal(url) {
  try {
    const r = await fetch(url.replace(/^ws/, "http"), { cache: "no-store" });
    if (r.status !== 426) return `the server refused the connection: ${(await r.text()).trim()} (HTTP ${r.status})`;
  } catch { /* the server is unreachable */ }
  return null;
}

function closeReason(code) {
  if (code === 1000) return "the conversation ended";
  if (code === 1006) return "the connection failed or was refused (check the server, and the API key if it needs one)";
  return "the connection closed";
}

// ------------------------------------------------------------------------------------------
// The page

function setState(state, text) {
  stats.state = state;
  $("state").dataset.state = state;
  $("state").textContent = text;
}

function showError(message) {
  stats.error = message;
  $("error").textContent = message;
  $("error").hidden = false;
}

function setBusy(busy) {
  $("connect").disabled = busy;
  $("disconnect").disabled = !busy;
  for (const id of ["voice", "prompt", "seed", "temp-text", "temp-audio", "api-key"]) $(id).disabled = busy;
}

function chatUrl() {
  const q = new URLSearchParams({ text_prompt: $("prompt").value });
  if ($("voice").value) q.set("voice_prompt", $("voice").value);   // none: the server's default voice
  const opt = { seed: "seed", text_temperature: "temp-text", audio_temperature: "temp-audio", api_key: "api-key" };
  for (const [name, id] of Object.entries(opt)) if ($(id).value.trim()) q.set(name, $(id).value.trim());
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  return `${scheme}://${location.host}/api/chat?${q}`;
}

function missingFeature() {
  if (!window.isSecureContext) {
    return "The microphone and the Opus codec need a secure page: open it over https (ppx-serve --ssl DIR) " +
           "or on localhost.";
  }
  if (!("AudioEncoder" in window) || !("AudioDecoder" in window)) {
    return "This browser lacks WebCodecs audio (AudioEncoder, AudioDecoder): use a current Chrome or Edge.";
  }
  if (!navigator.mediaDevices?.getUserMedia) return "This browser gives no access to the microphone.";
  return null;
}

// The voice list sits behind the server's API key when it has one: it is fetched with the key
// the page holds, and again whenever that key changes.
async function loadVoices() {
  const sel = $("voice");
  const key = $("api-key").value.trim();
  try {
    const r = await fetch("/api/voices", { cache: "no-store", headers: key ? { "X-API-Key": key } : {} });
    if (r.status === 401) {
      sel.replaceChildren(new Option(key ? "(the API key is not valid)" : "(enter the API key to list the voices)",
                                     ""));
      $("api-details").open = true;
      return;
    }
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const { voices } = await r.json();
    sel.replaceChildren(...voices.map((v) => new Option(v, v)));
    if (!voices.length) sel.append(new Option("(no voices on the server)", ""));
    const saved = localStorage.getItem("ppx.voice");
    if (saved && voices.includes(saved)) sel.value = saved;
  } catch (e) {
    sel.replaceChildren(new Option("(could not load voices)", ""));
    showError(`Could not load the voice list: ${e.message}`);
  }
}

let voicesTimer = null;
$("api-key").addEventListener("input", () => {
  clearTimeout(voicesTimer);
  voicesTimer = setTimeout(loadVoices, 300);
});

$("setup").addEventListener("submit", (e) => {
  e.preventDefault();
  if (session) return;
  const missing = missingFeature();
  if (missing) { showError(missing); return; }
  $("error").hidden = true;
  stats.error = null;
  localStorage.setItem("ppx.voice", $("voice").value);
  setBusy(true);
  $("transcript").replaceChildren();
  try {
    session = new Session(chatUrl());
  } catch (err) {
    showError(err.message);
    setBusy(false);
  }
});

$("disconnect").addEventListener("click", () => session?.close("you ended the conversation"));

loadVoices();
const missing = missingFeature();
if (missing) showError(missing);
