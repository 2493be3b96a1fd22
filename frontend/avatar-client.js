/**
 * avatar-client.js — the embeddable browser client of gpuserver (plain ES module, no deps).
 *
 * One WebSocket carries chat and WebRTC signalling (see docs/protocol.md); the avatar's
 * lip-synced video and its voice arrive over one RTCPeerConnection (recvonly audio + video,
 * both tracks in one MediaStream).
 *
 * Quick start (the client owns the socket, reconnects and renegotiates by itself):
 *
 *   import { AvatarWebRTCClient } from '/avatar-client.js';
 *   const client = await AvatarWebRTCClient.connect('/ws', { video: document.querySelector('video') });
 *   client.on('llm_text', (m) => console.log(m.delta));
 *   client.send('Hello!');                // LLM answers, the avatar speaks
 *   client.speak('Read this verbatim.');  // no LLM
 *   client.interrupt();                   // barge-in
 *
 * The original (seed) usage still works — the app owns the socket and forwards the answer:
 *
 *   const client = new AvatarWebRTCClient(websocket, videoElement);
 *   websocket.onopen = () => client.initialize();
 *   websocket.onmessage = (e) => { const m = JSON.parse(e.data);
 *                                  if (m.type === 'webrtc_answer') client.handleAnswer(m.sdp); };
 *
 * The client listens on the socket itself as well, so events (`on(...)`) work in both modes
 * and an answer is applied exactly once however often it is handed over. In that mode the
 * client renegotiates WebRTC on the same socket when ICE fails, but it does not reopen a
 * socket it does not own.
 *
 * Voice: `connect(url, {video, microphone: true})`, or later `startMicrophone()`, sends the
 * user's microphone (echo cancellation, noise suppression and auto gain on) on the same peer
 * connection; the server detects speech, transcribes it and answers it like `send(text)`.
 * Events: `user_speech_started`, `user_transcript` {text, final}, `user_speech_stopped`,
 * and `mic_level` {level: 0..1} about 20 times a second for a meter. Talking over the
 * avatar interrupts it (when the server's `voice.barge_in` is on).
 *
 * Reconnects resume the session: the client reopens the socket with the previous session's
 * id and resume key, and the server hands the same session back (history, avatar, and the
 * peer connection if it is still up: then no renegotiation is needed).
 *
 * Sound and autoplay: browsers block unmuted autoplay until the user interacts with the
 * page. The client first tries to play with sound; if that is refused it plays muted, emits
 * `audio` {muted: true, blocked: true}, and unmutes by itself on the first user gesture
 * (pointerdown / keydown / touchend anywhere in the page). Call `unmute()` from your own
 * click handler to do it explicitly (it must run inside a user gesture to succeed).
 */

const LOG_PREFIX = '[avatar]';
const SESSION_WAIT_MS = 3000; // initialize(): how long to wait for the `session` greeting
const CONNECT_TIMEOUT_MS = 15000; // connect(): greeting + answer must arrive within this
const ANSWER_TIMEOUT_MS = 10000; // an offer without an answer is retried after this
const ICE_CONNECT_TIMEOUT_MS = 15000; // answered, but ICE never connected: renegotiate
const DISCONNECT_GRACE_MS = 3000; // ICE `disconnected` for this long: renegotiate
const RENEGOTIATE_MAX_DELAY_MS = 10000;
const RECONNECT_BASE_MS = 500;
const RECONNECT_MAX_MS = 15000;
const KEEPALIVE_MS = 15000; // managed sockets: ping this often ...
const KEEPALIVE_TIMEOUT_MS = 10000; // ... and reconnect when no pong comes back in time
const PING_TIMEOUT_MS = 10000;
const GESTURE_EVENTS = ['pointerdown', 'keydown', 'touchend'];
const MIC_LEVEL_MS = 50; // `mic_level` events this often while the microphone is on
const MIC_CONSTRAINTS = { echoCancellation: true, noiseSuppression: true, autoGainControl: true };
const CLOSE_REASONS = {
  1001: 'the server went away',
  1006: 'the connection to the server was lost',
  1008: 'the server refused the connection (token or origin)',
  1009: 'a message was too large for the server',
  1011: 'the server hit an internal error',
  1012: 'the server is restarting',
  1013: 'the server is busy',
};

/**
 * @typedef {'connecting'|'connected'|'reconnecting'|'closed'} ConnectionState
 *
 * @typedef {Object} StateInfo
 * @property {ConnectionState} state  overall state
 * @property {'connecting'|'open'|'closing'|'closed'} ws  the WebSocket
 * @property {RTCPeerConnectionState|'none'} peer  the current RTCPeerConnection
 * @property {RTCIceConnectionState|'none'} ice  its ICE connection
 * @property {string|null} sessionId  from the latest `session` greeting
 * @property {number} attempt  recovery attempt (0 when healthy)
 *
 * @typedef {Object} IceServerInfo
 * @property {string[]} urls
 * @property {string} [username]
 * @property {string} [credential]
 *
 * @typedef {Object} SessionMessage
 * @property {'session'} type
 * @property {string} session_id
 * @property {string} avatar_id
 * @property {{id: string, name: string}[]} avatars
 * @property {IceServerInfo[]} ice_servers
 * @property {number} protocol
 * @property {string} server_version
 * @property {Readiness} readiness  whether a chat can be answered now (then `readiness` events)
 * @property {string|null} tts_voice  the session's voice; null: the server's default
 * @property {{asr: string|null, barge_in: boolean}} voice  whether the server listens
 * @property {string} resume_key  a reconnect presents it to resume this session
 * @property {boolean} resumed  this greeting continues the session after a reconnect
 *
 * @typedef {Object} BackendReadiness
 * @property {string} backend  e.g. 'local', 'openai', 'espeak'
 * @property {'ready'|'loading'|'unavailable'} state
 * @property {string|null} message  why it is unavailable
 * @property {number|null} eta_s  seconds it should still load (at the time it was sent)
 *
 * @typedef {Object} Readiness
 * @property {boolean} ready  the LLM and the TTS can both answer
 * @property {BackendReadiness} llm
 * @property {BackendReadiness} tts
 *
 * @typedef {Object} ErrorMessage
 * @property {'error'} type
 * @property {string} code  a server code (invalid_message, no_peer, llm_error, ...) or a
 *   client one: not_connected, connection_closed, unauthorized, webrtc_failed, timeout
 * @property {string} message  readable text
 * @property {string|null} ref  the `id` (or type) of the message it is about
 * @property {boolean} [local]  true when the client, not the server, raised it
 *
 * @typedef {Object} AudioInfo
 * @property {boolean} muted  true while the page plays no sound
 * @property {boolean} blocked  true when autoplay policy forced the mute (waiting for a gesture)
 * @property {'live'|'ended'|'none'} track  the remote audio track's readyState
 * @property {boolean} trackMuted  true while no audio packets arrive on that track
 *
 * @typedef {Object} AvatarStats
 * @property {number|null} fps  decoded video frames per second (recent)
 * @property {number} framesDecoded
 * @property {number} framesDropped
 * @property {{video: number|null, audio: number|null}} jitterBufferDelayMs  mean delay of
 *   the receive jitter buffers since the previous getStats() call (cumulative on the first)
 * @property {number|null} roundTripTimeMs  ICE candidate-pair RTT of the media path
 * @property {number} bytesReceived  audio + video RTP payload bytes
 * @property {number|null} frameWidth
 * @property {number|null} frameHeight
 * @property {number} packetsLost
 * @property {number} timestamp  performance.now() of the report
 *
 * @typedef {Object} ClientOptions
 * @property {HTMLMediaElement|boolean} [audio=true]  true: sound through the video element;
 *   an <audio> element: sound through it (the video stays muted); false: no sound
 * @property {string} [token]  auth token, sent as ?token= (connect() only)
 * @property {string} [avatarId]  avatar to select after every session greeting
 * @property {RTCIceServer[]} [iceServers]  overrides the server's `session.ice_servers`
 * @property {boolean} [reconnect=true]  reopen a lost socket (connect() only) and
 *   renegotiate a failed peer connection
 * @property {(state: StateInfo) => void} [onState]  shorthand for on('state', fn)
 * @property {Record<string, (payload: any) => void>} [on]  listeners to attach before
 *   connecting, e.g. {error: fn, session: fn}, so that no early event is missed
 * @property {boolean} [trickle=true]  send the offer at once and trickle candidates; false:
 *   wait for ICE gathering and send every candidate inside the offer (for relays that drop
 *   trickled candidates; slower to connect)
 * @property {boolean} [debug=false]  log signalling details to the console
 * @property {boolean} [microphone=false]  connect(): send the microphone from the start
 *   (a refusal does not fail connect(): it is emitted as an `error` with its code)
 */

/** @param {RTCPeerConnection} pc */
const iceGatheringComplete = (pc) =>
  new Promise((resolve) => {
    if (pc.iceGatheringState === 'complete') return resolve();
    pc.addEventListener('icegatheringstatechange', () => {
      if (pc.iceGatheringState === 'complete') resolve();
    });
  });

/** @param {...any} args */
const log = (...args) => console.info(LOG_PREFIX, ...args);
/** @param {...any} args */
const warn = (...args) => console.warn(LOG_PREFIX, ...args);

let clientCounter = 0;

export class AvatarWebRTCClient {
  /**
   * @param {WebSocket|null} websocket  an app-owned socket (seed usage), or null when
   *   created by connect()
   * @param {HTMLVideoElement} videoElement  where the avatar plays
   * @param {ClientOptions} [options]
   */
  constructor(websocket, videoElement, options = {}) {
    /** @type {WebSocket|null} */
    this.websocket = null;
    /** @type {HTMLVideoElement} */
    this.videoElement = videoElement;
    /** @type {RTCPeerConnection|null} */
    this.peerConnection = null;
    /** @type {MediaStream|null} the remote stream (audio + video) */
    this.stream = null;
    /** @type {SessionMessage|null} the latest `session` greeting */
    this.session = null;
    /** @type {string|null} the avatar the server reports as current */
    this.avatarId = null;
    /** @type {Readiness|null} the server's latest readiness (greeting, then `readiness`) */
    this.readiness = null;
    /** @type {string|null} the session's TTS voice (null: the server's default) */
    this.voice = null;

    this._options = {
      audio: true,
      reconnect: true,
      trickle: true,
      debug: false,
      microphone: false,
      ...options,
    };
    this._managed = false; // true when connect() created the socket (we may reopen it)
    this._url = null;
    this._closed = false;
    this._listeners = new Map();
    this._idPrefix = `c${(++clientCounter).toString(36)}${Math.random().toString(36).slice(2, 6)}-`;
    this._idCounter = 0;
    this._desiredAvatar = options.avatarId || null;
    this._desiredVoice = undefined; // set by setVoice(); re-applied after a reconnect

    this._peer = null; // {pc, offerId, offerSent, pendingLocal, answered, pendingRemote, timers}
    this._pendingOffers = []; // peers whose offer waits for its answer, in send order
    this._seenAnswers = new Set();
    this._renegotiateTimer = null;
    this._peerAttempt = 0;
    this._everConnected = false;

    this._reconnectTimer = null;
    this._resumeFrom = null; // the session a reconnect asks the server to resume
    this._socketAttempt = 0;
    this._detachSocket = null;
    this._sessionWaiters = [];
    this._pings = new Map();
    this._lastPingT = 0;
    this._keepaliveTimer = null;
    this._sessionsSeen = 0;

    /** @type {MediaStream|null} the user's microphone, while it is on */
    this._micStream = null;
    this._micMeter = null; // {context, timer} of the level meter
    this._audioBlocked = false;
    this._gestureHandler = null;
    this._lastState = null;
    this._prevStats = null;

    if (typeof this._options.onState === 'function') this.on('state', this._options.onState);
    for (const [event, fn] of Object.entries(this._options.on || {})) this.on(event, fn);
    if (websocket) this._attachSocket(websocket);
  }

  // --- construction ----------------------------------------------------------------------

  /**
   * Open the WebSocket, wait for the `session` greeting, set up WebRTC and resolve with the
   * client once the server's answer is applied (media follows within milliseconds).
   * Afterwards the client reconnects by itself (exponential backoff) unless `reconnect`
   * is false. Rejects if the first connection fails.
   *
   * @param {string} url  ws(s):// URL, or a path such as '/ws' (resolved against the page)
   * @param {ClientOptions & {video: HTMLVideoElement}} options
   * @returns {Promise<AvatarWebRTCClient>}
   */
  static async connect(url, options) {
    if (!options || !options.video) throw new TypeError('connect(url, {video}) needs a video element');
    const client = new AvatarWebRTCClient(null, options.video, options);
    client._managed = true;
    client._url = socketUrl(url, options.token);
    if (options.microphone) {
      // Before the first offer, so that it already carries the microphone.
      await client.startMicrophone().catch((error) => client._emitError(error));
    }
    try {
      await client._start();
    } catch (error) {
      client.close();
      throw error;
    }
    return client;
  }

  async _start() {
    const ready = new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => reject(clientError('timeout', 'no session greeting and WebRTC answer in time')),
        CONNECT_TIMEOUT_MS,
      );
      const done = (fn, value) => {
        clearTimeout(timer);
        offAnswer();
        offClosed();
        fn(value);
      };
      const offAnswer = this.on('_answered', () => done(resolve));
      const offClosed = this.on('_socket_closed', (info) =>
        done(reject, clientError(info.code === 1008 ? 'unauthorized' : 'connection_closed', info.message)),
      );
    });
    this._openSocket();
    await ready;
  }

  // --- public API ------------------------------------------------------------------------

  /**
   * Create a fresh RTCPeerConnection (recvonly audio + video), send its offer over the
   * socket and trickle its ICE candidates. Replaces any previous peer connection. Waits
   * briefly for the `session` greeting to learn the ICE servers.
   * @returns {Promise<void>}
   */
  async initialize() {
    if (this._closed) throw new Error('the client is closed');
    if (!this.session && !this._options.iceServers) await this._waitForSession(SESSION_WAIT_MS);
    await this._negotiate('initialize');
  }

  /**
   * Apply the server's `webrtc_answer`. Safe to call for an answer the client already
   * applied itself (it is applied once) or for a stale one (ignored).
   * @param {string} sdp
   * @returns {Promise<boolean>} true if this call applied it
   */
  async handleAnswer(sdp) {
    return this._acceptAnswer(sdp);
  }

  /**
   * Send a chat message: the LLM answers (events `llm_text`, `text`) and the avatar speaks.
   * A chat while the avatar speaks interrupts it first.
   * @param {string} text
   * @returns {string} the message id (events about it carry it as `ref`)
   */
  send(text) {
    return this._request({ type: 'chat', text: String(text) });
  }

  /**
   * Speak `text` verbatim (no LLM). Without `queue` it interrupts what is being spoken.
   * @param {string} text
   * @param {{queue?: boolean}} [options]
   * @returns {string} the message id
   */
  speak(text, { queue = false } = {}) {
    return this._request({ type: 'speak', text: String(text), queue: !!queue });
  }

  /**
   * Barge-in: stop speaking now (a no-op on the server when nothing is spoken).
   * @returns {string} the message id
   */
  interrupt() {
    return this._request({ type: 'interrupt' });
  }

  /**
   * Switch the avatar; `avatar` {avatar_id} confirms, `error` {code: 'avatar_not_found'}
   * refuses. Remembered and re-applied after a reconnect.
   * @param {string} avatarId
   * @returns {string} the message id
   */
  setAvatar(avatarId) {
    this._desiredAvatar = avatarId;
    return this._request({ type: 'set_avatar', avatar_id: String(avatarId) });
  }

  /**
   * Pick the session's TTS voice (ids from GET /api/voices; null: the server's default);
   * `voice` {voice} confirms, `error` {code: 'voice_not_found'} refuses. Remembered and
   * re-applied after a reconnect.
   * @param {string|null} voice
   * @returns {string} the message id
   */
  setVoice(voice) {
    this._desiredVoice = voice == null ? null : String(voice);
    return this._request({ type: 'set_voice', voice: this._desiredVoice });
  }

  /**
   * Round trip over the WebSocket.
   * @returns {Promise<number>} milliseconds; rejects if no pong arrives within 10 s
   */
  ping() {
    // An integer (microseconds, unique per client) survives the JSON round trip exactly.
    const t = Math.max(Math.round(performance.now() * 1000), this._lastPingT + 1);
    this._lastPingT = t;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pings.delete(t);
        reject(clientError('timeout', 'no pong within 10 s'));
      }, PING_TIMEOUT_MS);
      this._pings.set(t, { resolve, reject, timer, sent: performance.now() });
      if (!this._sendRaw({ type: 'ping', t })) {
        clearTimeout(timer);
        this._pings.delete(t);
        reject(clientError('not_connected', 'the WebSocket is not open'));
      }
    });
  }

  /**
   * Subscribe to an event: 'session', 'llm_text', 'text', 'speech_started',
   * 'speech_stopped', 'interrupted', 'metrics', 'error', 'avatar', 'voice', 'readiness'
   * (Readiness, also after each greeting), 'pong', 'state',
   * 'audio' (AudioInfo), 'track' (MediaStream) or 'message' (every server message).
   * @param {string} event
   * @param {(payload: any) => void} fn
   * @returns {() => void} unsubscribe
   */
  on(event, fn) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }

  /**
   * @param {string} event
   * @param {(payload: any) => void} fn
   */
  off(event, fn) {
    this._listeners.get(event)?.delete(fn);
  }

  /**
   * Turn the sound on. Call it from a user gesture (click/keydown) when autoplay blocked
   * sound; the client also does it by itself on the first gesture.
   * @returns {Promise<boolean>} true if sound now plays
   */
  async unmute() {
    const element = this._soundElement();
    if (!element) return false;
    element.muted = false;
    try {
      await element.play();
      /** @type {MediaStream|null} the user's microphone, while it is on */
    this._micStream = null;
    this._micMeter = null; // {context, timer} of the level meter
    this._audioBlocked = false;
      this._removeGestureHandler();
      this._emitAudio();
      return true;
    } catch (error) {
      if (error && error.name === 'AbortError') return !element.muted;
      // Still no user activation: unmuting paused the element, so play on muted.
      element.muted = true;
      element.play().catch(() => {});
      this._audioBlocked = true;
      this._installGestureHandler();
      this._emitAudio();
      return false;
    }
  }

  /** @returns {AudioInfo} */
  audioStatus() {
    const track = this.stream?.getAudioTracks()[0];
    const element = this._soundElement();
    return {
      muted: !element || element.muted || element.paused,
      blocked: this._audioBlocked,
      track: track ? /** @type {'live'|'ended'} */ (track.readyState) : 'none',
      trackMuted: track ? track.muted : true,
    };
  }

  /** @returns {StateInfo} the current state */
  get state() {
    return this._computeState();
  }

  /**
   * Receive statistics of the current peer connection.
   * @returns {Promise<AvatarStats|null>} null without a peer connection
   */
  async getStats() {
    const pc = this.peerConnection;
    if (!pc) return null;
    const report = await pc.getStats();
    let video = null;
    let audio = null;
    let transport = null;
    const pairs = new Map();
    report.forEach((s) => {
      if (s.type === 'inbound-rtp' && (s.kind || s.mediaType) === 'video') video = s;
      else if (s.type === 'inbound-rtp' && (s.kind || s.mediaType) === 'audio') audio = s;
      else if (s.type === 'transport') transport = s;
      else if (s.type === 'candidate-pair') pairs.set(s.id, s);
    });
    let pair = transport?.selectedCandidatePairId ? pairs.get(transport.selectedCandidatePairId) : null;
    if (!pair) pair = [...pairs.values()].find((p) => p.nominated && p.state === 'succeeded') || null;

    const now = performance.now();
    const prev = this._prevStats && this._prevStats.pc === pc ? this._prevStats : null;
    const jitter = (s, key) => {
      if (!s || s.jitterBufferEmittedCount == null || !s.jitterBufferEmittedCount) return null;
      const p = prev?.[key];
      const dCount = p ? s.jitterBufferEmittedCount - p.count : 0;
      if (p && dCount > 0) return round1(((s.jitterBufferDelay - p.delay) / dCount) * 1000);
      return round1((s.jitterBufferDelay / s.jitterBufferEmittedCount) * 1000);
    };
    let fps = video?.framesPerSecond ?? null;
    if (fps == null && video && prev?.video && now > prev.time) {
      fps = ((video.framesDecoded - prev.video.frames) * 1000) / (now - prev.time);
    }
    const stats = {
      fps: fps == null ? null : round1(fps),
      framesDecoded: video?.framesDecoded ?? 0,
      framesDropped: video?.framesDropped ?? 0,
      jitterBufferDelayMs: { video: jitter(video, 'video'), audio: jitter(audio, 'audio') },
      roundTripTimeMs: pair?.currentRoundTripTime != null ? round1(pair.currentRoundTripTime * 1000) : null,
      bytesReceived: (video?.bytesReceived ?? 0) + (audio?.bytesReceived ?? 0),
      frameWidth: video?.frameWidth ?? null,
      frameHeight: video?.frameHeight ?? null,
      packetsLost: (video?.packetsLost ?? 0) + (audio?.packetsLost ?? 0),
      timestamp: now,
    };
    const jitterState = (s) => s && { delay: s.jitterBufferDelay ?? 0, count: s.jitterBufferEmittedCount ?? 0 };
    this._prevStats = {
      pc,
      time: now,
      video: video && { frames: video.framesDecoded ?? 0, ...jitterState(video) },
      audio: jitterState(audio),
    };
    return stats;
  }

  /**
   * Stop everything: the peer connection, timers, gesture handlers and — if connect()
   * opened it — the WebSocket. No reconnect follows. An app-owned socket stays open.
   */
  close() {
    if (this._closed) return;
    this._closed = true;
    clearTimeout(this._reconnectTimer);
    clearTimeout(this._renegotiateTimer);
    clearInterval(this._keepaliveTimer);
    this._teardownPeer();
    this._pendingOffers = [];
    for (const { reject, timer } of this._pings.values()) {
      clearTimeout(timer);
      reject(clientError('connection_closed', 'the client was closed'));
    }
    this._pings.clear();
    const socket = this.websocket;
    if (this._detachSocket) this._detachSocket();
    if (this._managed && socket && socket.readyState <= WebSocket.OPEN) socket.close(1000, 'client closed');
    this._removeGestureHandler();
    this._rejectSessionWaiters();
    this._releaseMicrophone();
    this._emitState(true);
    log('closed');
  }

  // --- microphone (voice input) ----------------------------------------------------------

  /** Whether the server can listen: it reports a speech recogniser in its greeting. */
  get voiceAvailable() {
    return Boolean(this.session && this.session.voice && this.session.voice.asr);
  }

  /** Whether the microphone is on (it may be muted). */
  get microphoneActive() {
    return this._micStream !== null;
  }

  /**
   * Turn the microphone on: ask for it (echo cancellation, noise suppression and auto gain
   * on) and send it on a renegotiated peer connection over the same socket. Rejects with a
   * client error whose `code` says why: `insecure_context` (the page is not HTTPS or
   * localhost), `mic_denied` (permission refused), `no_microphone`, `voice_unavailable`
   * (the server has no speech recognition configured: `asr.backend`).
   */
  async startMicrophone() {
    if (this._micStream) return;
    if (this.session && !this.voiceAvailable) {
      throw clientError(
        'voice_unavailable',
        'the server has no speech recognition: set asr.backend (see its README, "Voice")',
      );
    }
    const media = typeof navigator !== 'undefined' ? navigator.mediaDevices : undefined;
    if (!media || !media.getUserMedia || (typeof isSecureContext !== 'undefined' && !isSecureContext)) {
      throw clientError('insecure_context', 'the microphone needs the page on HTTPS (or localhost)');
    }
    let stream;
    try {
      stream = await media.getUserMedia({ audio: MIC_CONSTRAINTS });
    } catch (error) {
      if (error && error.name === 'NotAllowedError') {
        throw clientError('mic_denied', 'microphone permission was refused: allow it in the browser');
      }
      if (error && (error.name === 'NotFoundError' || error.name === 'OverconstrainedError')) {
        throw clientError('no_microphone', 'no microphone was found');
      }
      throw clientError('no_microphone', `the microphone could not be opened: ${error && error.message}`);
    }
    if (this._closed) {
      stream.getTracks().forEach((track) => track.stop());
      return;
    }
    this._micStream = stream;
    this._startMeter(stream);
    this._emit('microphone', { on: true, muted: false });
    if (this.session) await this._negotiate('microphone on', { deliberate: true });
  }

  /** Turn the microphone off: release the device and renegotiate without it. */
  async stopMicrophone() {
    if (!this._micStream) return;
    this._releaseMicrophone();
    this._emit('microphone', { on: false, muted: false });
    if (this.session) await this._negotiate('microphone off', { deliberate: true });
  }

  /** Mute or unmute the microphone without renegotiating (muted, it sends silence). */
  setMicrophoneMuted(muted) {
    if (!this._micStream) return;
    for (const track of this._micStream.getAudioTracks()) track.enabled = !muted;
    this._emit('microphone', { on: true, muted: Boolean(muted) });
  }

  _releaseMicrophone() {
    if (this._micMeter) {
      clearInterval(this._micMeter.timer);
      this._micMeter.context.close().catch(() => {});
      this._micMeter = null;
    }
    if (this._micStream) this._micStream.getTracks().forEach((track) => track.stop());
    this._micStream = null;
  }

  /** @param {MediaStream} stream */
  _startMeter(stream) {
    const Context = typeof AudioContext !== 'undefined' ? AudioContext : null;
    if (!Context) return;
    const context = new Context();
    const analyser = context.createAnalyser();
    analyser.fftSize = 1024;
    context.createMediaStreamSource(stream).connect(analyser);
    const samples = new Float32Array(analyser.fftSize);
    const timer = setInterval(() => {
      analyser.getFloatTimeDomainData(samples);
      let sum = 0;
      for (const value of samples) sum += value * value;
      // RMS in dBFS mapped onto 0..1 over -60..0 dB: a meter, not a measurement.
      const db = 10 * Math.log10(sum / samples.length + 1e-12);
      this._emit('mic_level', { level: Math.max(0, Math.min(1, (db + 60) / 60)) });
    }, MIC_LEVEL_MS);
    this._micMeter = { context, timer };
  }

  // --- WebSocket -------------------------------------------------------------------------

  _openSocket() {
    if (this._closed) return;
    log(this._socketAttempt ? `reconnecting (attempt ${this._socketAttempt})` : 'connecting', redactToken(this._url));
    let socket;
    try {
      socket = new WebSocket(this._resumeUrl());
    } catch (error) {
      this._emitError(clientError('connection_closed', `cannot open the WebSocket: ${error.message}`));
      this._closed = true;
      this._emitState(true);
      return;
    }
    this._attachSocket(socket);
  }

  /** The socket URL; after a first session, it asks the server to resume that session. */
  _resumeUrl() {
    const url = new URL(this._url);
    const previous = this._resumeFrom;
    if (previous && previous.resume_key) {
      url.searchParams.set('session_id', previous.session_id);
      url.searchParams.set('resume_key', previous.resume_key);
      if (previous.replica) url.searchParams.set('replica', previous.replica); // a cluster's
    }
    return url.toString();
  }

  /** @param {WebSocket} socket */
  _attachSocket(socket) {
    if (this._detachSocket) this._detachSocket();
    this.websocket = socket;
    const onOpen = () => {
      this._emitState();
      if (this._managed) this._startKeepalive();
    };
    const onMessage = (event) => this._onMessage(event);
    const onClose = (event) => this._onSocketClose(socket, event);
    const onError = () => this._debug('WebSocket error');
    socket.addEventListener('open', onOpen);
    socket.addEventListener('message', onMessage);
    socket.addEventListener('close', onClose);
    socket.addEventListener('error', onError);
    this._detachSocket = () => {
      socket.removeEventListener('open', onOpen);
      socket.removeEventListener('message', onMessage);
      socket.removeEventListener('close', onClose);
      socket.removeEventListener('error', onError);
      this._detachSocket = null;
    };
    this._emitState();
  }

  /**
   * @param {WebSocket} socket
   * @param {CloseEvent} event
   */
  _onSocketClose(socket, event) {
    if (socket !== this.websocket) return;
    if (this._detachSocket) this._detachSocket();
    clearInterval(this._keepaliveTimer);
    const fatal = event.code === 1008; // auth / origin refused: retrying cannot help
    const reconnect =
      !this._closed && this._managed && this._options.reconnect && !fatal && this._sessionsSeen > 0;
    // The server keeps a dropped session (and its peer connection) for a while: a reconnect
    // resumes it, and an answered peer may carry on as it is.
    this._resumeFrom = reconnect ? this.session : null;
    if (!(reconnect && this._peer && this._peer.answered)) this._teardownPeer();
    this._pendingOffers = [];
    this.session = null;
    for (const { reject, timer } of this._pings.values()) {
      clearTimeout(timer);
      reject(clientError('connection_closed', 'the WebSocket closed'));
    }
    this._pings.clear();
    const reason = event.reason ? `: ${event.reason}` : '';
    const why = CLOSE_REASONS[event.code] || 'the connection to the server closed';
    const message = `${why} (code ${event.code}${reason})`;
    this._emit('_socket_closed', { code: event.code, message });
    if (this._closed) return;
    if (reconnect) {
      log(`${message}; reconnecting`);
      this._scheduleReconnect(event.code === 1013 ? 5000 : event.code === 1012 ? 1000 : 0);
      return;
    }
    warn(message);
    this._emitError(clientError(fatal ? 'unauthorized' : 'connection_closed', message));
    if (this._managed) this._closed = true;
    this._emitState(true);
  }

  _scheduleReconnect(minDelay = 0) {
    clearTimeout(this._reconnectTimer);
    const attempt = this._socketAttempt++;
    const base = Math.min(RECONNECT_BASE_MS * 2 ** attempt, RECONNECT_MAX_MS);
    const delay = Math.max(minDelay, base * (0.8 + Math.random() * 0.4));
    this._emitState();
    this._reconnectTimer = setTimeout(() => this._openSocket(), delay);
  }

  _startKeepalive() {
    clearInterval(this._keepaliveTimer);
    this._keepaliveTimer = setInterval(() => {
      const socket = this.websocket;
      if (!socket || socket.readyState !== WebSocket.OPEN) return;
      let answered = false;
      this.ping().then(
        () => (answered = true),
        () => {},
      );
      setTimeout(() => {
        if (!answered && socket === this.websocket && socket.readyState === WebSocket.OPEN) {
          warn('no pong: the connection looks dead; reconnecting');
          // Do not wait for a closing handshake that may never finish.
          this._onSocketClose(socket, /** @type {CloseEvent} */ ({ code: 4000, reason: 'keepalive timeout' }));
          try {
            socket.close(4000, 'keepalive timeout');
          } catch {}
        }
      }, KEEPALIVE_TIMEOUT_MS);
    }, KEEPALIVE_MS);
  }

  /** @param {MessageEvent} event */
  _onMessage(event) {
    if (typeof event.data !== 'string') return;
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      warn('ignoring a frame that is not JSON');
      return;
    }
    if (!message || typeof message.type !== 'string') return;
    this._debug('<-', message.type);
    switch (message.type) {
      case 'session':
        this._onSession(message);
        break;
      case 'webrtc_answer':
        this._acceptAnswer(message.sdp);
        break;
      case 'webrtc_ice_candidate':
        this._onRemoteCandidate(message.candidate ?? null);
        break;
      case 'pong':
        this._onPong(message);
        break;
      case 'avatar':
        this.avatarId = message.avatar_id;
        this._emit('avatar', message);
        break;
      case 'voice':
        this.voice = message.voice;
        this._emit('voice', message);
        break;
      case 'readiness':
        this.readiness = message;
        this._emit('readiness', message);
        break;
      case 'error':
        this._onServerError(message);
        break;
      default:
        this._emit(message.type, message);
    }
    this._emit('message', message);
  }

  /** @param {SessionMessage} message */
  _onSession(message) {
    this.session = message;
    this.avatarId = message.avatar_id;
    this.voice = message.tts_voice ?? null;
    this.readiness = message.readiness ?? null;
    this._sessionsSeen += 1;
    this._socketAttempt = 0;
    log(`session ${message.session_id} (server ${message.server_version}, protocol ${message.protocol})`);
    if (message.protocol !== 1) warn(`server speaks protocol ${message.protocol}; this client knows 1`);
    const waiters = this._sessionWaiters.splice(0);
    waiters.forEach((w) => w.resolve(message));
    this._emit('session', message);
    if (this.readiness) this._emit('readiness', this.readiness);
    if (this._desiredAvatar && this._desiredAvatar !== message.avatar_id) {
      this._request({ type: 'set_avatar', avatar_id: this._desiredAvatar });
    }
    if (this._desiredVoice !== undefined && this._desiredVoice !== this.voice) {
      this._request({ type: 'set_voice', voice: this._desiredVoice });
    }
    if (this._managed) {
      this._peerAttempt = 0;
      const pc = this._peer && this._peer.pc;
      if (message.resumed && pc && ['connected', 'connecting'].includes(pc.connectionState)) {
        log('session resumed: the peer connection carries on');
      } else {
        this._negotiate('session').catch((error) => this._peerFailed(error));
      }
    }
    this._emitState();
  }

  /** @param {ErrorMessage} message */
  _onServerError(message) {
    const offerIndex = this._pendingOffers.findIndex((p) => p.offerId && p.offerId === message.ref);
    if (offerIndex >= 0) {
      // Our offer was refused (bad_sdp, ...): no answer will come for it.
      const [peer] = this._pendingOffers.splice(offerIndex, 1);
      if (peer === this._peer) this._scheduleRenegotiation(`offer refused: ${message.code}`);
    }
    if (message.code === 'avatar_not_found' && this._desiredAvatar) this._desiredAvatar = null;
    if (message.code === 'voice_not_found') this._desiredVoice = undefined;
    warn(`server error ${message.code}: ${message.message}`);
    this._emitError(message);
  }

  _onPong(message) {
    const pending = this._pings.get(message.t);
    let rttMs = null;
    if (pending) {
      this._pings.delete(message.t);
      clearTimeout(pending.timer);
      rttMs = round1(performance.now() - pending.sent);
      pending.resolve(rttMs);
    }
    this._emit('pong', { ...message, rttMs });
  }

  /**
   * Send a request with a fresh id; an unsendable one becomes an `error` event.
   * @param {Record<string, any>} message
   * @returns {string}
   */
  _request(message) {
    const id = this._idPrefix + ++this._idCounter;
    if (!this._sendRaw({ ...message, id })) {
      const what = message.type;
      this._emitError(clientError('not_connected', `cannot send ${what}: not connected to the server`, id));
    }
    return id;
  }

  /** @returns {boolean} whether it went out */
  _sendRaw(message) {
    const socket = this.websocket;
    if (this._closed || !socket || socket.readyState !== WebSocket.OPEN) return false;
    this._debug('->', message.type);
    socket.send(JSON.stringify(message));
    return true;
  }

  _waitForSession(timeoutMs) {
    if (this.session) return Promise.resolve(this.session);
    return new Promise((resolve) => {
      const waiter = { resolve: (s) => (clearTimeout(timer), resolve(s)) };
      const timer = setTimeout(() => {
        this._sessionWaiters = this._sessionWaiters.filter((w) => w !== waiter);
        resolve(null);
      }, timeoutMs);
      this._sessionWaiters.push(waiter);
    });
  }

  _rejectSessionWaiters() {
    this._sessionWaiters.splice(0).forEach((w) => w.resolve(null));
  }

  // --- WebRTC ----------------------------------------------------------------------------

  _iceServers() {
    if (this._options.iceServers) return this._options.iceServers;
    return (this.session?.ice_servers || []).map((s) => {
      const server = { urls: s.urls };
      if (s.username != null) server.username = s.username;
      if (s.credential != null) server.credential = s.credential;
      return server;
    });
  }

  /**
   * @param {string} reason  for the log
   * @param {{deliberate?: boolean}} [options]  deliberate: the app changed what is sent (the
   *   microphone); until the new peer connects the client still counts as connected
   */
  async _negotiate(reason, { deliberate = false } = {}) {
    if (this._closed) return;
    clearTimeout(this._renegotiateTimer);
    this._renegotiateTimer = null;
    this._teardownPeer();
    const pc = new RTCPeerConnection({ iceServers: this._iceServers(), bundlePolicy: 'max-bundle' });
    const peer = {
      pc,
      offerId: null,
      offerSent: false,
      pendingLocal: [],
      answered: false,
      remoteSet: false,
      pendingRemote: [],
      timers: new Set(),
      graceTimer: null,
      audioChecked: false,
      deliberate,
    };
    this._peer = peer;
    this.peerConnection = pc;
    this._debug(`negotiating (${reason})`);

    const mic = this._micStream && this._micStream.getAudioTracks()[0];
    if (mic) pc.addTransceiver(mic, { direction: 'sendrecv', streams: [this._micStream] });
    else pc.addTransceiver('audio', { direction: 'recvonly' });
    pc.addTransceiver('video', { direction: 'recvonly' });
    pc.ontrack = (event) => {
      if (this._peer === peer) this._onTrack(event);
    };
    pc.onicecandidate = (event) => {
      if (this._peer !== peer || !this._options.trickle) return;
      const c = event.candidate;
      if (c && !c.candidate) return; // per-m-line end marker: the null event follows
      const message = {
        type: 'webrtc_ice_candidate',
        candidate: c ? { candidate: c.candidate, sdpMid: c.sdpMid, sdpMLineIndex: c.sdpMLineIndex } : null,
      };
      if (peer.offerSent) this._sendRaw(message);
      else peer.pendingLocal.push(message); // gathered before the offer went out
    };
    const onChange = () => this._onPeerState(peer);
    pc.onconnectionstatechange = onChange;
    pc.oniceconnectionstatechange = onChange;

    const offer = await pc.createOffer();
    if (this._peer !== peer) return;
    await pc.setLocalDescription(offer);
    if (this._peer !== peer) return;
    if (!this._options.trickle) {
      await iceGatheringComplete(pc);
      if (this._peer !== peer) return;
    }
    peer.offerId = this._idPrefix + ++this._idCounter;
    this._pendingOffers.push(peer);
    const sdp = this._options.trickle ? offer.sdp : pc.localDescription.sdp;
    if (!this._sendRaw({ type: 'webrtc_offer', sdp, id: peer.offerId })) {
      this._pendingOffers = this._pendingOffers.filter((p) => p !== peer);
      throw clientError('not_connected', 'cannot send the WebRTC offer: the WebSocket is not open');
    }
    peer.offerSent = true;
    for (const message of peer.pendingLocal.splice(0)) this._sendRaw(message);
    this._peerTimer(peer, ANSWER_TIMEOUT_MS, () => {
      if (!peer.answered) this._scheduleRenegotiation('no answer to the offer');
    });
    this._emitState();
  }

  /** @param {string} sdp */
  async _acceptAnswer(sdp) {
    if (typeof sdp !== 'string' || !sdp) return false;
    if (this._seenAnswers.has(sdp)) return false;
    this._seenAnswers.add(sdp);
    if (this._seenAnswers.size > 16) this._seenAnswers.delete(this._seenAnswers.values().next().value);
    const peer = this._pendingOffers.shift();
    if (!peer || peer !== this._peer || peer.answered) {
      this._debug('ignoring an answer to a replaced offer');
      return false;
    }
    peer.answered = true; // before any await: a second hand-over must not apply it again
    try {
      await peer.pc.setRemoteDescription({ type: 'answer', sdp });
    } catch (error) {
      if (this._peer !== peer) return false;
      this._emitError(clientError('webrtc_failed', `the server's answer was not accepted: ${error.message}`));
      this._scheduleRenegotiation('answer rejected');
      return false;
    }
    if (this._peer !== peer) return false;
    peer.remoteSet = true;
    for (const candidate of peer.pendingRemote.splice(0)) this._addRemoteCandidate(peer, candidate);
    this._peerTimer(peer, ICE_CONNECT_TIMEOUT_MS, () => {
      if (peer.pc.connectionState !== 'connected') this._scheduleRenegotiation('ICE did not connect');
    });
    this._emit('_answered', {});
    this._emitState();
    return true;
  }

  _onRemoteCandidate(candidate) {
    const peer = this._peer;
    if (!peer) return;
    if (peer.remoteSet) this._addRemoteCandidate(peer, candidate);
    else peer.pendingRemote.push(candidate);
  }

  _addRemoteCandidate(peer, candidate) {
    const init = candidate && candidate.candidate ? candidate : null;
    const added = init ? peer.pc.addIceCandidate(init) : peer.pc.addIceCandidate();
    added.catch((error) => this._debug('remote candidate rejected:', error.message));
  }

  _onPeerState(peer) {
    if (this._peer !== peer) return;
    const { connectionState: state, iceConnectionState: ice } = peer.pc;
    this._debug(`peer ${state}, ice ${ice}`);
    if (state === 'connected') {
      clearTimeout(peer.graceTimer);
      peer.graceTimer = null;
      if (this._peerAttempt || !this._everConnected) log('media connected');
      if (!peer.audioChecked) {
        peer.audioChecked = true;
        this._peerTimer(peer, 3000, () => this._checkAudioArrives());
      }
      this._peerAttempt = 0;
      this._everConnected = true;
    } else if (state === 'failed' || ice === 'failed') {
      this._scheduleRenegotiation('ICE failed');
    } else if ((state === 'disconnected' || ice === 'disconnected') && !peer.graceTimer) {
      peer.graceTimer = setTimeout(() => {
        peer.graceTimer = null;
        if (this._peer === peer && peer.pc.connectionState !== 'connected') {
          this._scheduleRenegotiation('ICE disconnected');
        }
      }, DISCONNECT_GRACE_MS);
    }
    this._emitState();
  }

  /** A remote track reads `live` even when nothing arrives; `muted` tells the truth. */
  _checkAudioArrives() {
    const track = this.stream?.getAudioTracks()[0];
    if (!track) warn('the peer connection carries no audio track');
    else if (track.readyState !== 'live' || track.muted) {
      warn(`no audio arrives (audio track ${track.readyState}${track.muted ? ', muted' : ''})`);
    }
  }

  _peerFailed(error) {
    if (this._closed) return;
    if (error?.code === 'not_connected') return; // the socket is down: reconnect handles it
    warn('WebRTC setup failed:', error?.message || error);
    this._scheduleRenegotiation('setup failed');
  }

  /** Replace the peer connection on the same socket, with backoff between attempts. */
  _scheduleRenegotiation(reason) {
    if (this._closed || this._renegotiateTimer) return;
    if (!this._options.reconnect) {
      this._emitError(clientError('webrtc_failed', `media connection lost (${reason})`));
      return;
    }
    const socket = this.websocket;
    if (!socket || socket.readyState !== WebSocket.OPEN) return; // socket recovery comes first
    const attempt = this._peerAttempt++;
    const delay = attempt === 0 ? 0 : Math.min(1000 * 2 ** (attempt - 1), RENEGOTIATE_MAX_DELAY_MS);
    log(`${reason}: renegotiating${delay ? ` in ${Math.round(delay)} ms` : ''} (attempt ${attempt + 1})`);
    if (attempt === 3) {
      this._emitError(clientError('webrtc_failed', `the media connection keeps failing (${reason}); still retrying`));
    }
    this._renegotiateTimer = setTimeout(() => {
      this._renegotiateTimer = null;
      this._negotiate(reason).catch((error) => this._peerFailed(error));
    }, delay);
    this._emitState();
  }

  _peerTimer(peer, ms, fn) {
    const timer = setTimeout(() => {
      peer.timers.delete(timer);
      if (this._peer === peer) fn();
    }, ms);
    peer.timers.add(timer);
  }

  _teardownPeer() {
    const peer = this._peer;
    if (!peer) return;
    this._peer = null;
    this.peerConnection = null;
    peer.timers.forEach(clearTimeout);
    clearTimeout(peer.graceTimer);
    peer.pc.ontrack = peer.pc.onicecandidate = null;
    peer.pc.onconnectionstatechange = peer.pc.oniceconnectionstatechange = null;
    try {
      peer.pc.close();
    } catch {}
  }

  /** @param {RTCTrackEvent} event */
  _onTrack(event) {
    let stream = event.streams && event.streams[0];
    if (!stream) {
      stream = this.stream && this._streamPeer === this._peer ? this.stream : new MediaStream();
      stream.addTrack(event.track);
    }
    this._streamPeer = this._peer;
    const fresh = stream !== this.stream;
    this.stream = stream;
    if (event.track.kind === 'audio') {
      const update = () => this._emitAudio();
      event.track.addEventListener('mute', update);
      event.track.addEventListener('unmute', update);
      event.track.addEventListener('ended', update);
    }
    this._debug(`track ${event.track.kind}`);
    if (fresh) {
      this._attachMedia(stream);
      this._emit('track', stream);
    }
  }

  // --- playback and sound ----------------------------------------------------------------

  /** @returns {HTMLMediaElement|null} the element whose `muted` decides what we hear */
  _soundElement() {
    const audio = this._options.audio;
    if (audio === false) return null;
    if (audio && typeof audio === 'object') return audio;
    return this.videoElement;
  }

  /** @param {MediaStream} stream */
  _attachMedia(stream) {
    const video = this.videoElement;
    const audioOption = this._options.audio;
    const separate = audioOption && typeof audioOption === 'object' ? audioOption : null;
    if (video) {
      video.playsInline = true;
      video.autoplay = true;
      if (video.srcObject !== stream) video.srcObject = stream;
    }
    if (separate && separate.srcObject !== stream) {
      separate.autoplay = true;
      separate.srcObject = stream;
    }
    if (video && (separate || audioOption === false)) {
      video.muted = true;
      playQuietly(video);
    }
    const sound = this._soundElement();
    if (!sound) return;
    // Try with sound; fall back to muted playback when autoplay policy refuses it.
    const wantSound = !this._audioBlocked;
    sound.muted = !wantSound;
    sound.play().then(
      () => this._emitAudio(),
      (error) => {
        if (error && error.name === 'NotAllowedError') {
          log('autoplay with sound was refused: playing muted until the first user gesture');
          this._audioBlocked = true;
          sound.muted = true;
          playQuietly(sound);
          this._installGestureHandler();
          this._emitAudio();
        } else if (error && error.name !== 'AbortError') {
          warn('playback failed:', error.message);
        }
      },
    );
    if (this._audioBlocked) this._installGestureHandler();
    this._emitAudio();
  }

  _installGestureHandler() {
    if (this._gestureHandler || typeof window === 'undefined') return;
    this._gestureHandler = () => {
      if (this._audioBlocked) this.unmute();
      else this._removeGestureHandler();
    };
    for (const type of GESTURE_EVENTS) window.addEventListener(type, this._gestureHandler, true);
  }

  _removeGestureHandler() {
    if (!this._gestureHandler) return;
    for (const type of GESTURE_EVENTS) window.removeEventListener(type, this._gestureHandler, true);
    this._gestureHandler = null;
  }

  _emitAudio() {
    this._emit('audio', this.audioStatus());
  }

  // --- state and events ------------------------------------------------------------------

  _computeState() {
    const socket = this.websocket;
    const ws = !socket ? 'closed' : ['connecting', 'open', 'closing', 'closed'][socket.readyState];
    const pc = this.peerConnection;
    const peer = pc ? pc.connectionState : 'none';
    const ice = pc ? pc.iceConnectionState : 'none';
    /** @type {ConnectionState} */
    let state;
    if (this._closed || (!this._managed && this._sessionsSeen > 0 && ws === 'closed')) state = 'closed';
    else if (ws === 'open' && (peer === 'connected' || this._switchingPeer(peer))) state = 'connected';
    else if (this._everConnected || (this._sessionsSeen > 0 && this._socketAttempt > 0)) state = 'reconnecting';
    else state = 'connecting';
    return {
      state,
      ws,
      peer,
      ice,
      sessionId: this.session?.session_id ?? null,
      attempt: Math.max(this._peerAttempt, this._socketAttempt),
    };
  }

  /** A deliberate renegotiation (the microphone turned on or off) still connecting. */
  _switchingPeer(peerState) {
    return Boolean(this._peer && this._peer.deliberate && ['new', 'connecting'].includes(peerState));
  }

  _emitState(force = false) {
    const info = this._computeState();
    const last = this._lastState;
    if (
      !force &&
      last &&
      last.state === info.state &&
      last.ws === info.ws &&
      last.peer === info.peer &&
      last.ice === info.ice &&
      last.sessionId === info.sessionId
    ) {
      return;
    }
    if (last && last.state !== info.state) log(`state ${info.state}`);
    this._lastState = info;
    this._emit('state', info);
  }

  _emitError(error) {
    this._emit('error', error);
  }

  _emit(event, payload) {
    const listeners = this._listeners.get(event);
    if (!listeners) return;
    for (const fn of [...listeners]) {
      try {
        fn(payload);
      } catch (error) {
        console.error(LOG_PREFIX, `a '${event}' listener threw`, error);
      }
    }
  }

  _debug(...args) {
    if (this._options.debug) console.debug(LOG_PREFIX, ...args);
  }
}

// --- helpers ---------------------------------------------------------------------------

/**
 * @param {string} code
 * @param {string} message
 * @param {string|null} [ref]
 * @returns {ErrorMessage & Error}
 */
function clientError(code, message, ref = null) {
  const error = /** @type {any} */ (new Error(message));
  error.type = 'error';
  error.code = code;
  error.ref = ref;
  error.local = true;
  return error;
}

/** Resolve '/ws' against the page, map http(s) to ws(s), add ?token=. */
function socketUrl(url, token) {
  const base = typeof location !== 'undefined' ? location.href : 'http://localhost/';
  const resolved = new URL(url, base);
  if (resolved.protocol === 'http:') resolved.protocol = 'ws:';
  if (resolved.protocol === 'https:') resolved.protocol = 'wss:';
  if (token) resolved.searchParams.set('token', token);
  return resolved.toString();
}

function redactToken(url) {
  return String(url).replace(/([?&]token=)[^&]*/, '$1…');
}

/** @param {HTMLMediaElement} element */
function playQuietly(element) {
  element.play().catch((error) => {
    if (error && error.name !== 'AbortError') warn('muted playback failed:', error.message);
  });
}

function round1(value) {
  return Math.round(value * 10) / 10;
}

export default AvatarWebRTCClient;
