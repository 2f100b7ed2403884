// LEELOO in a browser: a crew member that speaks the devices' WebSocket
// protocol (join_crew, ack, client_msg_id).
//
// Rules this file keeps:
// - Everything that comes from the wire is shown with textContent, never as
//   markup.  Links only for spotify: URIs and https://open.spotify.com/
//   URLs; images only from Spotify's image hosts over https.
// - The browser keeps its device id, device key, name, crew and last seq in
//   localStorage ("leeloo." keys; "Forget this browser" removes them all).
//   Each open tab takes its own identity slot (a Web Lock), so two tabs are
//   two crew members rather than one device replacing itself.
// - It reconnects by itself with exponential backoff and full jitter.
"use strict";
(function () {
  var PREFIX = "leeloo.";
  var SLOTS = 8;
  var BASE_DELAY = 1000;
  var MAX_DELAY = 30000;
  var ACK_DELAY = 200;
  var FEED_LIMIT = 200;
  var IMAGE_HOST = /^(i\.scdn\.co|mosaic\.scdn\.co|[a-z0-9-]+(\.[a-z0-9-]+)*\.spotifycdn\.com)$/;
  var SPOTIFY_URI = /^spotify:(track|album|playlist|artist|episode|show):([A-Za-z0-9]{1,64})$/;
  var SPOTIFY_PATH = /^\/(?:intl-[a-z]{2}(?:-[a-z]{2})?\/)?(track|album|playlist|artist|episode|show)\/([A-Za-z0-9]{1,64})\/?$/;
  var REACTIONS = { love: "love", fire: "fire" };

  var $ = function (id) { return document.getElementById(id); };
  var ui = {
    status: $("status"), notice: $("notice"),
    joinView: $("join-view"), joinForm: $("join-form"), code: $("crew-code"), name: $("display-name"),
    crewView: $("crew-view"), crewLabel: $("crew-label"), online: $("online"),
    feedView: $("feed-view"), feed: $("feed"), feedEmpty: $("feed-empty"),
    textForm: $("text-form"), text: $("text"),
    songForm: $("song-form"), songLink: $("song-link"), songTrack: $("song-track"),
    songArtist: $("song-artist"), songNote: $("song-note"),
    nudge: $("nudge"), leave: $("leave"), forget: $("forget"),
  };

  // ------------------------------------------------------------ storage

  var slot = null;        // this tab's identity slot, or null: nothing kept
  var identity = {};      // {device_id, device_key, name, crew_code, seqs: {CODE: seq}}

  function storageKey() { return PREFIX + "identity." + slot; }

  function load() {
    if (slot === null) return {};
    try {
      var value = JSON.parse(localStorage.getItem(storageKey()) || "{}");
      return value && typeof value === "object" ? value : {};
    } catch (e) {
      return {};
    }
  }

  function save() {
    if (slot === null) return;
    try { localStorage.setItem(storageKey(), JSON.stringify(identity)); } catch (e) { /* full or off */ }
  }

  function forgetAll() {
    try {
      for (var i = localStorage.length - 1; i >= 0; i--) {
        var key = localStorage.key(i);
        if (key && key.indexOf(PREFIX) === 0) localStorage.removeItem(key);
      }
    } catch (e) { /* storage off */ }
    identity = {};
  }

  // One identity per open tab: the first slot whose lock is free.
  function claimSlot() {
    return new Promise(function (resolve) {
      if (!navigator.locks || !navigator.locks.request) { resolve(0); return; }
      var i = 0;
      function next() {
        if (i >= SLOTS) { resolve(null); return; }
        navigator.locks.request(PREFIX + "slot." + i, { ifAvailable: true }, function (lock) {
          if (!lock) { i++; next(); return undefined; }
          resolve(i);
          return new Promise(function () {});  // held for as long as the tab lives
        }).catch(function () { resolve(0); });
      }
      next();
    });
  }

  function lastSeq(code) {
    var seqs = identity.seqs || {};
    return typeof seqs[code] === "number" ? seqs[code] : null;
  }

  function setLastSeq(code, seq) {
    identity.seqs = identity.seqs || {};
    if (seq === null) delete identity.seqs[code]; else identity.seqs[code] = seq;
    save();
  }

  // ------------------------------------------------------------ display

  function text(value) {
    if (typeof value === "string") return value;
    if (typeof value === "number" || typeof value === "boolean") return String(value);
    return "";
  }

  function element(tag, className, content) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (content !== undefined) node.textContent = content;
    return node;
  }

  function setState(state, message) {
    ui.status.setAttribute("data-state", state);
    ui.status.textContent = message;
  }

  function setNotice(kind, message) {
    ui.notice.setAttribute("data-kind", kind || "");
    ui.notice.textContent = message || "";
  }

  function showCrew(code) {
    ui.joinView.hidden = !!code;
    ui.crewView.hidden = !code;
    ui.feedView.hidden = !code;
    ui.leave.hidden = !code;
    ui.crewLabel.textContent = code || "";
  }

  // A link for a Spotify URI or open.spotify.com URL; null for anything else.
  function spotifyLink(value) {
    value = text(value).trim();
    var match = SPOTIFY_URI.exec(value);
    if (match) return "https://open.spotify.com/" + match[1] + "/" + match[2];
    var url;
    try { url = new URL(value); } catch (e) { return null; }
    if (url.protocol !== "https:" || url.hostname !== "open.spotify.com" || url.username || url.password || url.port) return null;
    return url.href;
  }

  // spotify:TYPE:ID from what a person pasted; null if it is neither form.
  function spotifyUri(value) {
    value = value.trim();
    var match = SPOTIFY_URI.exec(value);
    if (match) return value;
    var url;
    try { url = new URL(value); } catch (e) { return null; }
    if (url.protocol !== "https:" || url.hostname !== "open.spotify.com") return null;
    match = SPOTIFY_PATH.exec(url.pathname);
    return match ? "spotify:" + match[1] + ":" + match[2] : null;
  }

  function imageUrl(value) {
    var url;
    try { url = new URL(text(value)); } catch (e) { return null; }
    if (url.protocol !== "https:" || !IMAGE_HOST.test(url.hostname) || url.username || url.password || url.port) return null;
    return url.href;
  }

  function when(timestamp) {
    var date = typeof timestamp === "number" ? new Date(timestamp) : new Date();
    return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function addItem(item) {
    ui.feedEmpty.hidden = true;
    ui.feed.insertBefore(item, ui.feed.firstChild);
    while (ui.feed.children.length > FEED_LIMIT) ui.feed.removeChild(ui.feed.lastChild);
  }

  function item(kind, who, timestamp) {
    var li = element("li");
    li.setAttribute("data-kind", kind);
    var body = element("div", "body");
    var head = element("p");
    head.appendChild(element("span", "who", who));
    head.appendChild(document.createTextNode(" "));
    head.appendChild(element("span", "when", when(timestamp)));
    body.appendChild(head);
    li.appendChild(body);
    li.body = body;
    return li;
  }

  function line(li, className, content) {
    if (!content) return null;
    var p = element("p", className, content);
    li.body.appendChild(p);
    return p;
  }

  function song(li, fields) {
    var image = imageUrl(fields.album_art_url);
    if (image) {
      var img = element("img");
      img.alt = "Album art";
      img.src = image;
      img.referrerPolicy = "no-referrer";
      img.addEventListener("error", function () { img.hidden = true; });
      li.insertBefore(img, li.body);
    }
    line(li, "track", text(fields.track) || "A song");
    line(li, "artist", text(fields.artist));
    line(li, "album", text(fields.album));
    line(li, "text note", text(fields.note));
    var href = spotifyLink(fields.spotify_uri);
    if (href) {
      var p = element("p");
      var a = element("a", "open", "Open in Spotify");
      a.href = href;
      a.rel = "noopener noreferrer";
      a.target = "_blank";
      p.appendChild(a);
      li.body.appendChild(p);
    }
  }

  function reactionWord(value) {
    value = text(value);
    return REACTIONS[value] ? "sent " + REACTIONS[value] : "reacted " + value;
  }

  // One crew message, as the feed shows it.
  function render(m) {
    var li, p = m.payload && typeof m.payload === "object" ? m.payload : {};
    if (m.type === "music_shared") {
      li = item("song", text(m.pushed_by) + " shared a song", m.timestamp);
      song(li, m);
    } else if (m.type === "reaction") {
      li = item("reaction", text(m.from), m.timestamp);
      line(li, "text", reactionWord(m.reaction_type));
    } else {
      var who = text(m.from_name) || text(m.from_device);
      var type = text(m.msg_type);
      if (type === "song_push") {
        li = item("song", who + " shared a song", m.timestamp);
        song(li, p);
      } else if (type === "text") {
        li = item("text", who, m.timestamp);
        line(li, "text", text(p.text));
      } else if (type === "reaction") {
        li = item("reaction", who, m.timestamp);
        line(li, "text", reactionWord(p.reaction));
      } else if (type === "nudge") {
        li = item("nudge", who, m.timestamp);
        line(li, "text", "nudged the crew");
      } else if (type === "hang_propose") {
        li = item("hang", who, m.timestamp);
        line(li, "text", "wants to hang out: " + (text(p.description) || "something"));
        line(li, "when", text(p.datetime));
      } else if (type === "hang_confirm") {
        li = item("hang", who, m.timestamp);
        line(li, "text", "is in");
      } else {
        li = item("other", who, m.timestamp);
        line(li, "text", "sent a " + (type || "message") + " this page does not show");
      }
    }
    addItem(li);
  }

  // --------------------------------------------------------- the crew list

  var people = [];  // [{id, name}]; id null for names crew_joined listed

  function showPeople() {
    ui.online.textContent = "";
    ui.online.appendChild(element("li", "me", (identity.name || "You") + " (you)"));
    for (var i = 0; i < people.length; i++) ui.online.appendChild(element("li", null, people[i].name));
  }

  function memberJoined(id, name) {
    id = text(id); name = text(name) || id;
    for (var i = 0; i < people.length; i++) {
      if (people[i].id === id || (people[i].id === null && people[i].name === name)) {
        people[i] = { id: id, name: name };
        showPeople();
        return;
      }
    }
    people.push({ id: id, name: name });
    showPeople();
  }

  function memberOffline(id, name) {
    id = text(id); name = text(name);
    var at = -1;
    for (var i = 0; i < people.length; i++) if (people[i].id === id) at = i;
    if (at < 0) for (var j = 0; j < people.length; j++) if (people[j].id === null && people[j].name === name) { at = j; break; }
    if (at >= 0) people.splice(at, 1);
    showPeople();
  }

  // -------------------------------------------------------- the connection

  var ws = null;
  var crew = null;         // the crew code this tab is in (or trying to be)
  var joined = false;
  var attempt = 0;
  var retryTimer = null;
  var ackTimer = null;
  var pausedUntil = 0;
  var pauseTimer = null;
  var outbox = [];         // [{frame, state}] in order; the head is in flight once sent
  var inFlight = null;

  function frame(message) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(message));
  }

  function join(code) {
    crew = code;
    identity.crew_code = code;
    save();
    showCrew(code);
    showPeople();
    if (history.replaceState) history.replaceState(null, "", "/crew?code=" + encodeURIComponent(code));
    connect();
  }

  function connect() {
    clearTimeout(retryTimer);
    retryTimer = null;
    if (ws) return;
    joined = false;
    setState("connecting", "Connecting to crew " + crew + "…");
    var socket = ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
    socket.onopen = function () {
      var hello = { type: "join_crew", crew_code: crew, display_name: identity.name };
      if (identity.device_id) hello.device_id = identity.device_id;
      if (identity.device_key) hello.device_key = identity.device_key;
      var seq = lastSeq(crew);
      if (seq !== null) hello.last_seq = seq;
      frame(hello);
    };
    socket.onmessage = function (event) {
      var message;
      try { message = JSON.parse(event.data); } catch (e) { return; }
      if (message && typeof message === "object" && socket === ws) receive(message);
    };
    socket.onclose = function (event) {
      if (socket !== ws) return;
      ws = null;
      joined = false;
      inFlight = null;
      if (crew === null) return;
      if (event.code === 4001) {
        setState("replaced", "This LEELOO id connected from somewhere else, so this page stopped. Reload to take it back.");
        return;
      }
      retry(null);
    };
  }

  function disconnect() {
    clearTimeout(retryTimer);
    retryTimer = null;
    var socket = ws;
    ws = null;
    joined = false;
    inFlight = null;
    if (socket) socket.close(1000);
  }

  // Try again after a full-jitter exponential backoff (or after C{wait} ms).
  function retry(wait) {
    if (wait === null) {
      wait = Math.random() * Math.min(MAX_DELAY, BASE_DELAY * Math.pow(2, attempt));
      attempt = Math.min(attempt + 1, 16);
    }
    var seconds = Math.max(1, Math.ceil(wait / 1000));
    setState("offline", "Offline. Trying again in " + seconds + " s…");
    clearTimeout(retryTimer);
    retryTimer = setTimeout(connect, wait);
  }

  function receive(m) {
    switch (m.type) {
      case "crew_joined":
        identity.device_id = text(m.device_id) || identity.device_id;
        if (typeof m.device_key === "string") identity.device_key = m.device_key;
        save();
        joined = true;
        attempt = 0;
        crew = text(m.crew_code) || crew;
        showCrew(crew);
        people = [];
        (Array.isArray(m.member_names) ? m.member_names : []).forEach(function (name) {
          people.push({ id: null, name: text(name) });
        });
        showPeople();
        setState("online", "Online in crew " + crew + ".");
        if (ui.notice.getAttribute("data-kind") !== "refused") setNotice(null, "");
        pump();
        break;
      case "member_joined":
        memberJoined(m.device_id, m.display_name);
        break;
      case "member_offline":
        memberOffline(m.device_id, m.display_name);
        break;
      case "message":
      case "music_shared":
      case "reaction":
        crewMessage(m);
        break;
      case "replay_truncated":
        var lost = (typeof m.to_seq === "number" && typeof m.from_seq === "number") ? m.to_seq - m.from_seq + 1 : 0;
        var li = item("note", "LEELOO", null);
        line(li, "text", lost > 0 ? lost + " older messages were too old to replay." : "Some older messages were too old to replay.");
        addItem(li);
        break;
      case "sent":
        if (inFlight && m.client_msg_id === inFlight.frame.client_msg_id) {
          markSent(inFlight, "sent");
          outbox.shift();
          inFlight = null;
          pump();
        }
        break;
      case "error":
        refused(m);
        break;
      default:
        break;  // pong, spotify_auth_complete, and what a newer relay adds
    }
  }

  function crewMessage(m) {
    if (typeof m.seq === "number") {
      var seen = lastSeq(crew);
      if (seen !== null && m.seq <= seen) return;  // already shown
      setLastSeq(crew, m.seq);
      scheduleAck();
    }
    render(m);
  }

  // Acks are cumulative: one for the newest seq, shortly after a burst.
  function scheduleAck() {
    if (ackTimer) return;
    ackTimer = setTimeout(function () {
      ackTimer = null;
      var seq = lastSeq(crew);
      if (joined && seq !== null) frame({ type: "ack", seq: seq });
    }, ACK_DELAY);
  }

  function refused(m) {
    var code = text(m.error);
    var message = text(m.message) || code;
    if (code === "invalid_crew_code") {
      var unknown = crew;
      leave();
      setState("unknown-crew", "There is no crew " + unknown + ". Check the code on your LEELOO and try again.");
      ui.code.value = unknown;
      ui.code.focus();
      return;
    }
    if (code === "rate_limited") {
      var wait = (typeof m.retry_after === "number" ? m.retry_after : 5) * 1000;
      setNotice("rate-limited", "Slow down: the relay asks this page to wait " + Math.ceil(wait / 1000) + " s.");
      if (!joined) { disconnect(); retry(wait); return; }
      pause(wait);
      return;
    }
    if (!joined) {
      if (code === "device_auth_failed") {
        // This browser's id is not ours any more: start again with a new one.
        delete identity.device_id; delete identity.device_key; save();
      } else if (code === "invalid_last_seq") {
        setLastSeq(crew, null);
      } else {
        setNotice("refused", "The relay refused to let this page in: " + message);
      }
      disconnect();
      retry(code === "invalid_last_seq" || code === "device_auth_failed" ? 0 : null);
      return;
    }
    if (inFlight) {
      markSent(inFlight, "not sent: " + message, true);
      outbox.shift();
      inFlight = null;
    }
    setNotice("refused", "The relay refused a message: " + message);
    pump();
  }

  // --------------------------------------------------------- sending

  function pause(wait) {
    pausedUntil = Date.now() + wait;
    inFlight = null;  // resend it after the wait: client_msg_id keeps it once
    clearTimeout(pauseTimer);
    pauseTimer = setTimeout(function () {
      pausedUntil = 0;
      setNotice(null, "");
      pump();
    }, wait);
  }

  function pump() {
    if (!joined || inFlight || !outbox.length || Date.now() < pausedUntil) return;
    inFlight = outbox[0];
    frame(inFlight.frame);
  }

  function markSent(entry, state, bad) {
    entry.state.textContent = state;
    if (bad) entry.state.className = "state refused";
  }

  function newId() {
    var bytes = new Uint8Array(12);
    crypto.getRandomValues(bytes);
    return Array.prototype.map.call(bytes, function (b) { return ("0" + b.toString(16)).slice(-2); }).join("");
  }

  // Queue a crew message, show it as ours, and send it when we can.
  function send(message, show) {
    if (crew === null) return;
    message.client_msg_id = newId();
    var li = item(show.kind, "You", null);
    show.fill(li);
    var state = line(li, "state", joined ? "sending…" : "waiting for the connection…");
    addItem(li);
    outbox.push({ frame: message, state: state });
    pump();
  }

  ui.textForm.addEventListener("submit", function (event) {
    event.preventDefault();
    var value = ui.text.value.trim();
    if (!value) return;
    send({ type: "message", msg_type: "text", payload: { text: value } },
         { kind: "text", fill: function (li) { line(li, "text", value); } });
    ui.text.value = "";
  });

  document.querySelectorAll("[data-reaction]").forEach(function (button) {
    button.addEventListener("click", function () {
      var reaction = button.getAttribute("data-reaction");
      send({ type: "message", msg_type: "reaction", payload: { reaction: reaction, to_device: null } },
           { kind: "reaction", fill: function (li) { line(li, "text", reactionWord(reaction)); } });
    });
  });

  ui.nudge.addEventListener("click", function () {
    send({ type: "message", msg_type: "nudge", payload: {} },
         { kind: "nudge", fill: function (li) { line(li, "text", "nudged the crew"); } });
  });

  ui.songForm.addEventListener("submit", function (event) {
    event.preventDefault();
    var uri = spotifyUri(ui.songLink.value);
    if (!uri) {
      setNotice("refused", "That is not a Spotify link: paste a link from Spotify's Share menu, or a spotify: URI.");
      ui.songLink.focus();
      return;
    }
    var payload = { spotify_uri: uri, track: ui.songTrack.value.trim(), artist: ui.songArtist.value.trim(),
                    album: "", album_art_url: "", note: ui.songNote.value.trim() };
    send({ type: "message", msg_type: "song_push", payload: payload },
         { kind: "song", fill: function (li) { song(li, payload); } });
    setNotice(null, "");
    ui.songForm.reset();
  });

  ui.joinForm.addEventListener("submit", function (event) {
    event.preventDefault();
    var code = ui.code.value.trim().toUpperCase();
    var name = ui.name.value.trim();
    if (!code || !name) return;
    identity.name = name;
    setNotice(null, "");
    ui.feed.textContent = "";
    ui.feedEmpty.hidden = false;
    join(code);
  });

  function leave() {
    crew = null;
    disconnect();
    outbox = [];
    people = [];
    delete identity.crew_code;
    save();
    showCrew(null);
    setState("idle", "Enter a crew code to join.");
    if (history.replaceState) history.replaceState(null, "", "/crew");
  }

  ui.leave.addEventListener("click", leave);

  ui.forget.addEventListener("click", function () {
    leave();
    forgetAll();
    ui.feed.textContent = "";
    ui.feedEmpty.hidden = false;
    ui.code.value = "";
    ui.name.value = "";
    setNotice(null, "");
    setState("idle", "This browser forgot its LEELOO id and crews. Enter a crew code to join.");
  });

  // Leaving the page says goodbye at once (the crew sees this member go
  // offline); a page restored from the back/forward cache comes back.
  window.addEventListener("pagehide", function () { disconnect(); });
  window.addEventListener("pageshow", function (event) {
    if (event.persisted && crew !== null) connect();
  });

  // ------------------------------------------------------------ start

  claimSlot().then(function (claimed) {
    slot = claimed;
    identity = load();
    var asked = new URLSearchParams(location.search).get("code");
    var code = (asked || identity.crew_code || "").trim().toUpperCase();
    ui.code.value = code;
    ui.name.value = identity.name || "";
    if (code && identity.name) {
      join(code);
    } else {
      (code ? ui.name : ui.code).focus();
    }
    document.documentElement.setAttribute("data-ready", "true");
  });
})();
