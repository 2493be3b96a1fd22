// The chat page: avatar video beside a streamed transcript, driven by AvatarWebRTCClient.
import { AvatarWebRTCClient } from './avatar-client.js';

const $ = (selector) => document.querySelector(selector);
const video = $('#avatar-video');
const placeholder = $('#video-placeholder');
const input = $('#chat-input');
const form = $('#composer');
const sendButton = $('#send');
const interruptButton = $('#interrupt');
const micButton = $('#mic');
const micLevel = $('[data-testid="mic-level"]');
const micHint = $('#mic-hint');
const pttToggle = $('#ptt');
const transcript = $('#transcript');
const speaking = $('#speaking');
const connState = $('#conn-state');
const avatarSelect = $('#avatar-select');
const voiceSelect = $('#voice-select');
const videoFrame = $('.video-frame');
const readinessBox = $('#readiness');
const modelNote = $('#model-note');
const toasts = $('#toasts');
const soundHint = $('#sound-hint');
const statFirstFrame = $('#stat-first-frame');
const statRtt = $('#stat-rtt');
const statFps = $('#stat-fps');

const FRAME_LOG_LIMIT = 3000; // frames kept in window.avatarApp.frames (2 min at 25 fps)

/** @type {AvatarWebRTCClient|null} */
let client = null;
const frames = [];
let framesSeen = false; // a frame was presented since media last (re)connected
let blocked = null; // {title, message} once the server refused us for good (a wrong token)

// Test and debugging hooks.
window.avatarApp = {
  get client() {
    return client;
  },
  stats: () => (client ? client.getStats() : Promise.resolve(null)),
  frames,
};

// --- transcript --------------------------------------------------------------------------

/** Assistant bubbles by the `id` of the chat message they answer, and by turn id. */
const bubblesByRef = new Map();
const bubblesByTurn = new Map();
const pendingRefs = new Set(); // chat sent, turn not finished yet
const speakingTurns = new Set();

// Keep the newest message in view unless the reader scrolled up to read older ones.
function scrollToEnd() {
  if (transcript.dataset.follow !== 'false') transcript.scrollTop = transcript.scrollHeight;
}
transcript.addEventListener('scroll', () => {
  const atBottom = transcript.scrollHeight - transcript.scrollTop - transcript.clientHeight < 40;
  transcript.dataset.follow = atBottom ? 'true' : 'false';
});

function addItem(role, text = '') {
  $('#transcript-empty')?.remove();
  const item = document.createElement('li');
  item.className = `msg msg-${role}`;
  item.dataset.role = role;
  const content = document.createElement('div');
  content.className = 'content';
  content.textContent = text;
  item.append(content);
  transcript.append(item);
  transcript.dataset.follow = 'true';
  scrollToEnd();
  return item;
}

function addNote(text) {
  const item = addItem('note', text);
  item.setAttribute('role', 'note');
  return item;
}

function assistantBubble(message) {
  let bubble = bubblesByTurn.get(message.turn_id);
  if (bubble) return bubble;
  bubble = message.ref ? bubblesByRef.get(message.ref) : null;
  if (!bubble || (bubble.dataset.turnId && bubble.dataset.turnId !== message.turn_id)) {
    bubble = addItem('assistant');
  }
  bubble.dataset.turnId = message.turn_id;
  bubblesByTurn.set(message.turn_id, bubble);
  return bubble;
}

function setBubbleText(bubble, text) {
  bubble.querySelector('.content').textContent = text;
  bubble.dataset.text = text;
}

function setMeta(bubble, text) {
  let meta = bubble.querySelector('.meta');
  if (!meta) {
    meta = document.createElement('div');
    meta.className = 'meta';
    bubble.append(meta);
  }
  meta.textContent = text;
  scrollToEnd();
}

// --- activity (speaking indicator) ----------------------------------------------------------

const ACTIVITY_LABELS = { speaking: 'Speaking', thinking: 'Thinking…', loading: 'Loading model…', idle: 'Ready' };

function updateActivity() {
  const activity = speakingTurns.size
    ? 'speaking'
    : pendingRefs.size
      ? 'thinking'
      : llmLoading()
        ? 'loading'
        : 'idle';
  speaking.dataset.speaking = String(activity === 'speaking');
  speaking.dataset.activity = activity;
  speaking.querySelector('.speaking-label').textContent = ACTIVITY_LABELS[activity];
  interruptButton.dataset.active = String(activity === 'speaking' || activity === 'thinking');
}

function finishRef(ref) {
  if (ref && pendingRefs.delete(ref)) updateActivity();
}

// --- toasts ------------------------------------------------------------------------------

const recentToasts = new Map();

/**
 * @param {string} text
 * @param {{kind?: 'error'|'info'|'success', timeout?: number, title?: string}} [options]
 */
function toast(text, { kind = 'error', timeout = kind === 'error' ? 8000 : 4000, title } = {}) {
  const key = `${kind}:${title}:${text}`;
  const now = performance.now();
  if (recentToasts.has(key) && now - recentToasts.get(key) < 2000) return;
  recentToasts.set(key, now);
  const item = document.createElement('div');
  item.className = `toast toast-${kind}`;
  item.setAttribute('role', kind === 'error' ? 'alert' : 'status');
  const body = document.createElement('div');
  body.className = 'toast-body';
  if (title) {
    const strong = document.createElement('strong');
    strong.textContent = title;
    body.append(strong);
  }
  const span = document.createElement('span');
  span.textContent = text;
  body.append(span);
  const close = document.createElement('button');
  close.type = 'button';
  close.className = 'toast-close';
  close.setAttribute('aria-label', 'Dismiss');
  close.textContent = '×';
  const remove = () => {
    item.classList.add('leaving');
    setTimeout(() => item.remove(), 200);
  };
  close.addEventListener('click', remove);
  item.append(body, close);
  toasts.append(item);
  while (toasts.children.length > 4) toasts.firstElementChild.remove();
  if (timeout) setTimeout(remove, timeout);
}

const ERROR_TITLES = {
  invalid_json: 'Invalid message',
  invalid_message: 'Invalid message',
  unknown_type: 'Unknown message',
  too_large: 'Message too long',
  rate_limited: 'Slow down',
  no_peer: 'No video connection',
  bad_sdp: 'Video setup failed',
  avatar_not_found: 'Avatar not found',
  llm_error: 'The language model failed',
  tts_error: 'Speech synthesis failed',
  busy: 'Server busy',
  unauthorized: 'Not authorized',
  shutting_down: 'Server restarting',
  internal: 'Server error',
  not_connected: 'Not connected',
  connection_closed: 'Connection closed',
  webrtc_failed: 'Video connection problem',
  timeout: 'Timed out',
};

function showError(error) {
  const title = ERROR_TITLES[error.code] || `Error (${error.code || 'unknown'})`;
  toast(error.message || String(error), { kind: 'error', title });
}

// --- connection state --------------------------------------------------------------------

const STATE_LABELS = {
  connecting: 'Connecting…',
  connected: 'Connected',
  reconnecting: 'Reconnecting…',
  closed: 'Disconnected',
};
let lastState = 'connecting';
let hadConnected = false;

function showState(info) {
  const state = info.state;
  connState.dataset.state = state;
  connState.querySelector('.conn-label').textContent = blocked ? blocked.title : STATE_LABELS[state] || state;
  connState.title = `WebSocket ${info.ws} · peer ${info.peer} · ICE ${info.ice}` +
    (info.sessionId ? ` · session ${info.sessionId}` : '');
  if (state !== lastState) {
    if (state === 'reconnecting' && lastState === 'connected') {
      toast('Connection lost — reconnecting…', { kind: 'info' });
    } else if (state === 'connected' && hadConnected && lastState === 'reconnecting') {
      toast('Reconnected', { kind: 'success', timeout: 2500 });
    }
    if (state === 'connected') hadConnected = true;
    lastState = state;
  }
  if (state !== 'connected') {
    speakingTurns.clear();
    updateActivity();
  }
  // Cover the frozen (or, once its tracks end, black) video while media is not flowing.
  const waiting = state !== 'connected';
  placeholder.classList.toggle('hidden', !waiting && framesSeen);
  placeholder.querySelector('.placeholder-label').textContent = blocked
    ? blocked.title
    : state === 'closed'
      ? 'Disconnected'
      : state === 'reconnecting'
        ? 'Reconnecting…'
        : 'Connecting…';
  placeholder.dataset.state = state;
}

// --- readiness (is the language model loaded? is its server reachable?) -------------------

let readiness = null; // the latest Readiness from the server
let readinessAt = 0; // performance.now() when it arrived (eta_s counts from then)
let readinessTimer = null;

const llmLoading = () => readiness?.llm?.state === 'loading';

function applyReadiness(next) {
  readiness = next;
  readinessAt = performance.now();
  modelNote.hidden = next?.llm?.backend !== 'local';
  clearInterval(readinessTimer);
  if (llmLoading()) readinessTimer = setInterval(showReadiness, 1000);
  showReadiness();
  updateActivity();
  updateComposer();
}

function showReadiness() {
  const problem = ['llm', 'tts'].map((name) => [name, readiness?.[name]]).find(([, b]) => b && b.state !== 'ready');
  readinessBox.hidden = !problem;
  if (!problem) {
    readinessBox.dataset.state = 'ready';
    return;
  }
  const [name, backend] = problem;
  const what = name === 'llm' ? 'The language model' : 'Speech synthesis';
  let text;
  if (backend.state === 'loading') {
    const left = backend.eta_s != null ? backend.eta_s - (performance.now() - readinessAt) / 1000 : null;
    const eta = left == null || left < 1 ? '' : `, about ${Math.round(left)} s`;
    text = `${what} is loading${eta}. You can type now and send when it is ready.`;
  } else {
    text = `${what} is unavailable: ${backend.message || 'no answer from its server'}`;
  }
  readinessBox.dataset.state = backend.state;
  readinessBox.querySelector('.readiness-text').textContent = text;
}

// --- the composer: usable once connected and the language model can answer -----------------

function updateComposer() {
  input.disabled = !!blocked;
  sendButton.disabled = !!blocked || llmLoading();
  interruptButton.disabled = !!blocked;
  sendButton.title = llmLoading() ? 'The language model is still loading' : '';
}

/** The server refused us for good (wrong token): say so once, everywhere, and stop. */
function block(title, message) {
  blocked = { title, message };
  speaking.hidden = true;
  showState({ state: 'closed', ws: 'closed', peer: 'none', ice: 'none' });
  toast(message, { title, timeout: 0 });
  updateComposer();
}

// --- avatars -----------------------------------------------------------------------------

function fillAvatars(avatars, current) {
  if (!avatars || !avatars.length) return;
  const value = current || avatarSelect.value;
  avatarSelect.replaceChildren(
    ...avatars.map(({ id, name }) => {
      const option = document.createElement('option');
      option.value = id;
      option.textContent = name || id;
      return option;
    }),
  );
  if (value) avatarSelect.value = value;
}

// The server rescans its avatars folder on every listing: refresh when the picker opens.
avatarSelect.addEventListener('pointerdown', refreshAvatars);
avatarSelect.addEventListener('focus', refreshAvatars);

let avatarsRefresh = null; // pointerdown and focus come together: one request for both

function refreshAvatars() {
  avatarsRefresh ??= fetchJson('api/avatars')
    .then((listing) => {
      if (!avatarSelect.dataset.pending) fillAvatars(listing.avatars, client?.avatarId);
    })
    .catch(() => {}) // keep the list we have
    .finally(() => {
      avatarsRefresh = null;
    });
}

avatarSelect.addEventListener('change', () => {
  if (!client) return;
  avatarSelect.dataset.pending = avatarSelect.value;
  client.setAvatar(avatarSelect.value);
});

// --- voices ------------------------------------------------------------------------------

function fillVoices(listing) {
  const options = [new Option(listing.default ? `Default (${listing.default})` : 'Default', '')];
  for (const { id, name } of listing.voices) options.push(new Option(name && name !== id ? `${name} · ${id}` : id, id));
  voiceSelect.replaceChildren(...options);
  voiceSelect.value = client?.voice ?? '';
}

voiceSelect.addEventListener('change', () => {
  if (!client) return;
  voiceSelect.dataset.pending = voiceSelect.value;
  client.setVoice(voiceSelect.value || null);
});

// --- sending -----------------------------------------------------------------------------

form.addEventListener('submit', (event) => {
  event.preventDefault();
  const text = input.value.trim();
  if (!text) {
    input.focus();
    return;
  }
  if (blocked) {
    toast(blocked.message, { title: blocked.title });
    return;
  }
  if (!client) {
    toast('Still connecting to the server — try again in a moment.', { title: 'Not connected' });
    return;
  }
  if (llmLoading()) return; // the send button says why; the text stays in the box
  const id = client.send(text);
  addItem('user', text);
  const bubble = addItem('assistant');
  bubble.dataset.state = 'waiting';
  bubble.dataset.ref = id;
  bubble.querySelector('.content').innerHTML = '<span class="typing" aria-label="Thinking"><i></i><i></i><i></i></span>';
  bubblesByRef.set(id, bubble);
  pendingRefs.add(id);
  updateActivity();
  input.value = '';
  input.focus();
});

function interrupt() {
  if (!client) return;
  client.interrupt();
  interruptButton.classList.remove('flash');
  void interruptButton.offsetWidth; // restart the animation
  interruptButton.classList.add('flash');
}

interruptButton.addEventListener('click', interrupt);
document.addEventListener('keydown', (event) => {
  if (event.key === 'Escape' && !event.defaultPrevented) {
    event.preventDefault();
    interrupt();
  }
});

soundHint.addEventListener('click', () => client?.unmute());

// --- voice: the microphone button, push-to-talk, the user's words as they are heard --------

const MIC_HINTS = {
  voice_unavailable:
    'Voice input is off on this server: set asr.backend (README, “Voice”) to talk to the avatar.',
  insecure_context: 'The microphone needs this page on HTTPS (or on localhost).',
  mic_denied: 'The microphone is blocked: allow it for this site in the browser, then try again.',
  no_microphone: 'No microphone was found.',
};
let pushToTalk = false;
let spaceHeld = false;
let listeningBubble = null; // the user's bubble while they speak, until its transcript

function showMicHint(code, message) {
  micHint.hidden = !code;
  micHint.dataset.code = code || '';
  micHint.textContent = code ? MIC_HINTS[code] || message : '';
}

function showMic() {
  const on = !!client?.microphoneActive;
  micButton.setAttribute('aria-pressed', String(on));
  micButton.dataset.state = !on ? 'off' : pushToTalk && !spaceHeld ? 'held' : 'listening';
  micButton.title = on ? 'Stop the microphone' : 'Talk to the avatar';
  if (!on) micLevel.style.setProperty('--level', '0');
}

async function toggleMicrophone() {
  if (!client) return;
  try {
    if (client.microphoneActive) {
      await client.stopMicrophone();
    } else {
      await client.startMicrophone();
      client.setMicrophoneMuted(pushToTalk && !spaceHeld);
      showMicHint(null);
    }
  } catch (error) {
    showMicHint(error.code, error.message);
  }
  showMic();
}

micButton.addEventListener('click', toggleMicrophone);
pttToggle.addEventListener('change', () => {
  pushToTalk = pttToggle.checked;
  client?.setMicrophoneMuted(pushToTalk && !spaceHeld);
  showMic();
});
// Hold Space to talk (not while typing in the message box).
for (const [type, held] of [['keydown', true], ['keyup', false]]) {
  document.addEventListener(type, (event) => {
    if (event.code !== 'Space' || !pushToTalk || event.target === input || event.repeat) return;
    event.preventDefault();
    spaceHeld = held;
    client?.setMicrophoneMuted(!held);
    showMic();
  });
}

function wireVoice(c) {
  c.on('mic_level', (m) => micLevel.style.setProperty('--level', m.level.toFixed(2)));
  c.on('microphone', showMic);
  c.on('user_speech_started', () => {
    listeningBubble ??= addItem('user', '…');
    listeningBubble.dataset.state = 'listening';
  });
  c.on('user_speech_stopped', () => {
    if (listeningBubble) listeningBubble.dataset.state = 'transcribing';
  });
  c.on('user_transcript', (m) => {
    if (!m.final) return;
    const bubble = listeningBubble ?? addItem('user');
    listeningBubble = null;
    if (m.text.trim()) {
      bubble.querySelector('.content').textContent = m.text;
      bubble.dataset.state = 'heard';
    } else {
      bubble.remove(); // nothing intelligible: no empty bubble
    }
  });
  c.on('session', (session) => {
    // Without speech recognition the button stays, dimmed: a click says how to turn it on.
    micButton.dataset.available = String(Boolean(session.voice && session.voice.asr));
    if (micButton.dataset.available === 'true' && micHint.dataset.code === 'voice_unavailable') {
      showMicHint(null);
    }
  });
}

// --- client events -----------------------------------------------------------------------

function wire(c) {
  c.on('readiness', applyReadiness);
  c.on('session', (session) => {
    fillAvatars(session.avatars, session.avatar_id);
    voiceSelect.value = session.tts_voice ?? '';
    speakingTurns.clear();
    pendingRefs.clear();
    updateActivity();
    if (hadConnected) {
      addNote(
        session.resumed
          ? 'Reconnected — the conversation goes on.'
          : 'Reconnected — a new session started; earlier context is gone.',
      );
    }
  });
  c.on('llm_text', (m) => {
    const bubble = assistantBubble(m);
    if (bubble.dataset.state !== 'streaming') {
      bubble.dataset.state = 'streaming';
      setBubbleText(bubble, '');
    }
    setBubbleText(bubble, (bubble.dataset.text || '') + m.delta);
    scrollToEnd();
  });
  c.on('text', (m) => {
    $('#announcer').textContent = m.content;
    const bubble = assistantBubble(m);
    if (bubble.dataset.state === 'error') {
      // After an llm_error: keep the error shown unless part of an answer came first.
      if (m.content) setBubbleText(bubble, m.content);
      return;
    }
    setBubbleText(bubble, m.content);
    if (bubble.dataset.state !== 'interrupted') bubble.dataset.state = 'done';
    scrollToEnd();
  });
  c.on('speech_started', (m) => {
    speakingTurns.add(m.turn_id);
    bubblesByTurn.get(m.turn_id)?.classList.add('is-speaking');
    updateActivity();
  });
  c.on('speech_stopped', (m) => {
    speakingTurns.delete(m.turn_id);
    bubblesByTurn.get(m.turn_id)?.classList.remove('is-speaking');
    updateActivity();
  });
  c.on('interrupted', (m) => {
    speakingTurns.delete(m.turn_id);
    const bubble = bubblesByTurn.get(m.turn_id) || (m.ref && bubblesByRef.get(m.ref));
    if (bubble) {
      bubble.classList.remove('is-speaking');
      bubble.dataset.state = 'interrupted';
      const said = bubble.dataset.text || '';
      const heard = m.heard_text || '';
      const content = bubble.querySelector('.content');
      content.replaceChildren();
      if (heard) content.append(heard);
      const rest = said.startsWith(heard) ? said.slice(heard.length) : heard ? '' : said;
      if (rest) {
        const unheard = document.createElement('span');
        unheard.className = 'unheard';
        unheard.title = 'Not spoken';
        unheard.textContent = rest;
        content.append(unheard);
      }
      if (!heard && !rest) content.textContent = '…';
      setMeta(bubble, 'Interrupted');
    }
    finishRef(m.ref);
    updateActivity();
  });
  c.on('metrics', (m) => {
    finishRef(m.ref);
    if (m.first_frame_ms != null) statFirstFrame.textContent = `${Math.round(m.first_frame_ms)} ms`;
    const bubble = bubblesByTurn.get(m.turn_id);
    if (bubble) {
      const parts = [];
      if (m.interrupted) parts.push('Interrupted');
      // Non-breaking spaces keep each figure and its unit on one line.
      if (m.first_frame_ms != null) parts.push(`first\u00a0frame ${Math.round(m.first_frame_ms)}\u00a0ms`);
      if (m.llm_first_token_ms != null) parts.push(`LLM ${Math.round(m.llm_first_token_ms)}\u00a0ms`);
      if (m.spoken_ms) parts.push(`spoke ${(m.spoken_ms / 1000).toFixed(1)}\u00a0s`);
      if (parts.length) setMeta(bubble, parts.join(' · '));
      if (bubble.dataset.state === 'waiting') {
        bubble.dataset.state = 'done';
        setBubbleText(bubble, '');
      }
    }
    bubblesByTurn.delete(m.turn_id);
    if (m.ref) bubblesByRef.delete(m.ref);
  });
  c.on('voice', (m) => {
    voiceSelect.value = m.voice ?? '';
    if (voiceSelect.dataset.pending !== undefined && voiceSelect.dataset.pending === (m.voice ?? '')) {
      addNote(`Voice changed to ${voiceSelect.selectedOptions[0]?.textContent || m.voice || 'the default'}.`);
    }
    delete voiceSelect.dataset.pending;
  });
  c.on('avatar', (m) => {
    if (avatarSelect.querySelector(`option[value="${CSS.escape(m.avatar_id)}"]`)) avatarSelect.value = m.avatar_id;
    if (avatarSelect.dataset.pending === m.avatar_id) {
      const name = avatarSelect.selectedOptions[0]?.textContent || m.avatar_id;
      addNote(`Avatar changed to ${name}.`);
    }
    delete avatarSelect.dataset.pending;
  });
  c.on('error', (error) => {
    const bubble = error.ref && bubblesByRef.get(error.ref);
    // A failed answer says so in its own bubble; a toast as well would say it twice.
    if (!(bubble && error.code === 'llm_error')) showError(error);
    if (error.code === 'avatar_not_found' && client?.avatarId) {
      avatarSelect.value = client.avatarId;
      delete avatarSelect.dataset.pending;
    }
    if (error.code === 'voice_not_found') {
      voiceSelect.value = client?.voice ?? '';
      delete voiceSelect.dataset.pending;
    }
    if (bubble && (bubble.dataset.state === 'waiting' || error.code === 'llm_error')) {
      bubble.dataset.state = 'error';
      // No answer at all: the bubble says what went wrong instead of staying empty.
      if (!bubble.dataset.text) setBubbleText(bubble, `${ERROR_TITLES[error.code] || 'Failed'}: ${error.message}`);
      else setMeta(bubble, `Stopped: ${error.message}`);
    }
    if (bubble && bubble.dataset.state === 'error') finishRef(error.ref);
  });
  c.on('audio', showAudio);
  c.on('track', () => {
    framesSeen = false; // a new peer connection: wait for its first frame
  });
}

function showAudio(info) {
  soundHint.hidden = !info.blocked;
  video.dataset.audio = info.blocked ? 'blocked' : info.muted ? 'muted' : 'on';
}

// --- video frames & stats ----------------------------------------------------------------

// The frame takes the avatar's own shape, so portrait (or landscape) avatars show whole.
function fitVideoFrame() {
  if (video.videoWidth && video.videoHeight) {
    videoFrame.style.setProperty('--avatar-aspect', `${video.videoWidth} / ${video.videoHeight}`);
    videoFrame.style.setProperty('--avatar-ratio', String(video.videoWidth / video.videoHeight));
    videoFrame.dataset.orientation = video.videoHeight > video.videoWidth ? 'portrait' : 'landscape';
  }
}
video.addEventListener('loadedmetadata', fitVideoFrame);
video.addEventListener('resize', fitVideoFrame);

function watchFrames() {
  if (!('requestVideoFrameCallback' in HTMLVideoElement.prototype)) {
    video.addEventListener('playing', () => {
      framesSeen = true;
      placeholder.classList.add('hidden');
    });
    return;
  }
  const onFrame = (now, metadata) => {
    frames.push({ mediaTime: metadata.mediaTime, presentedFrames: metadata.presentedFrames, now });
    if (frames.length > FRAME_LOG_LIMIT) frames.splice(0, frames.length - FRAME_LOG_LIMIT);
    if (!framesSeen && connState.dataset.state === 'connected') {
      framesSeen = true;
      placeholder.classList.add('hidden');
    }
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

async function pollStats() {
  if (!client) return;
  try {
    const stats = await client.getStats();
    if (stats) {
      statFps.textContent = stats.fps != null ? `${Math.round(stats.fps)} fps` : '–';
      statFps.title = `${stats.framesDecoded} frames decoded, ${stats.framesDropped} dropped; ` +
        `jitter buffer video ${stats.jitterBufferDelayMs.video ?? '–'} ms, audio ${stats.jitterBufferDelayMs.audio ?? '–'} ms`;
      if (stats.roundTripTimeMs != null) statRtt.dataset.media = String(stats.roundTripTimeMs);
    }
  } catch {
    // the peer connection was replaced mid-call: next tick
  }
}

async function pollPing() {
  if (!client || client.state.ws !== 'open') return;
  try {
    const rtt = await client.ping();
    statRtt.textContent = `${Math.round(rtt)} ms`;
    const media = statRtt.dataset.media;
    statRtt.title = `WebSocket round trip ${rtt} ms` + (media ? `; media path ${media} ms` : '');
  } catch {
    statRtt.textContent = '–';
  }
}

// --- start -------------------------------------------------------------------------------

async function fetchJson(path) {
  const response = await fetch(path, { headers: { accept: 'application/json' } });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function start() {
  updateActivity();
  updateComposer();
  watchFrames();
  const params = new URLSearchParams(location.search);
  let token = params.get('token') || undefined;
  for (let attempt = 0; ; attempt++) {
    try {
      const [config, avatars] = await Promise.all([fetchJson('api/config'), fetchJson('api/avatars')]);
      fillAvatars(avatars.avatars, avatars.default);
      if (config.auth_required && !token) {
        block('Not authorized', 'This server needs a token: open the page as …/?token=YOUR_TOKEN.');
        return;
      }
      if (!config.auth_required) token = undefined;
      // ?trickle=0 sends every candidate inside the offer (see the client's options).
      const trickle = params.get('trickle') !== '0';
      client = await AvatarWebRTCClient.connect('ws', { video, token, trickle, onState: showState });
      break;
    } catch (error) {
      if (error.code === 'unauthorized') {
        block('Not authorized', `${error.message}. Check the ?token= in the page address.`);
        return;
      }
      const delay = Math.min(1000 * 2 ** attempt, 15000);
      showState({ state: attempt ? 'reconnecting' : 'connecting', ws: 'closed', peer: 'none', ice: 'none' });
      toast(`${error.message || error}. Retrying in ${Math.round(delay / 1000)} s.`, {
        title: 'Cannot reach the server',
        timeout: Math.min(delay, 8000),
      });
      await sleep(delay);
    }
  }
  wire(client);
  wireVoice(client);
  micButton.dataset.available = String(client.voiceAvailable);
  fillAvatars(client.session?.avatars, client.avatarId);
  avatarSelect.disabled = false;
  applyReadiness(client.readiness);
  fetchJson('api/voices')
    .then((listing) => {
      fillVoices(listing);
      voiceSelect.disabled = false;
    })
    .catch((error) => console.warn('no voice list:', error));
  showState(client.state);
  showAudio(client.audioStatus());
  setInterval(pollStats, 1000);
  setInterval(pollPing, 5000);
  pollPing();
  window.addEventListener('pagehide', () => client?.close());
  // Back from the back/forward cache the closed client cannot resume: start afresh.
  window.addEventListener('pageshow', (event) => {
    if (event.persisted) location.reload();
  });
}

start();
