// The Socket.IO chat server kinesis-chat is benchmarked against.
//
// Written the way a Node developer would write "a POST endpoint that
// broadcasts to a room" with Socket.IO 4.8: Node's own http server, the
// default Socket.IO server options, one `io.to(room).emit()` per message.
// Same JSON as ../../../../shared/PROTOCOL.md: POST /api/messages with
// {room?, author, text, client_id?} answers 201 {message: ChatMessage}.
// Clients join a room with `?room=` on the handshake.
//
//   node server.js [--port N] [--host 127.0.0.1]    (or PORT / HOST env)
//
// On start it prints "socketio-peer listening on http://HOST:PORT".

import { createServer } from "node:http";
import { randomUUID } from "node:crypto";
import { Server } from "socket.io";

const args = process.argv.slice(2);
const arg = (name, fallback) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 && i + 1 < args.length ? args[i + 1] : fallback;
};
const host = arg("host", process.env.HOST ?? "127.0.0.1");
const port = Number(arg("port", process.env.PORT ?? 0));

const ROOM_RE = /^[a-z0-9][a-z0-9_-]{0,63}$/;
const MAX_BODY_BYTES = 16 * 1024;
// Remembers recent client_ids so a retried POST answers 200 with the same
// message instead of showing it twice; bounded so it cannot grow forever.
const SEEN_LIMIT = 10_000;
const seen = new Map();

const sendJson = (res, status, body) => {
  const data = JSON.stringify(body);
  res.writeHead(status, {
    "content-type": "application/json",
    "content-length": Buffer.byteLength(data),
  });
  res.end(data);
};

// Control characters other than newline and tab (text) or none (author).
const hasControl = (s, allowNewlines) =>
  /[\u0000-\u001f\u007f]/.test(allowNewlines ? s.replace(/[\n\t]/g, "") : s);

function validate(body) {
  if (body === null || typeof body !== "object" || Array.isArray(body)) {
    return { error: "The body must be a JSON object." };
  }
  const room = body.room ?? "lobby";
  if (typeof room !== "string" || !ROOM_RE.test(room)) {
    return { error: "room must match ^[a-z0-9][a-z0-9_-]{0,63}$.", field: "room" };
  }
  const author = typeof body.author === "string" ? body.author.trim() : null;
  if (!author || [...author].length > 40 || hasControl(author, false)) {
    return { error: "author must be 1-40 characters without control characters.", field: "author" };
  }
  const text = typeof body.text === "string" ? body.text.trim() : null;
  if (!text || [...text].length > 4000 || hasControl(text, true)) {
    return { error: "text must be 1-4000 characters.", field: "text" };
  }
  if (body.client_id !== undefined && typeof body.client_id !== "string") {
    return { error: "client_id must be a UUID string.", field: "client_id" };
  }
  return { room, author, text, clientId: body.client_id };
}

const httpServer = createServer((req, res) => {
  const path = req.url.split("?", 1)[0];
  if (req.method === "GET" && path === "/healthz") {
    return sendJson(res, 200, { ok: true });
  }
  if (req.method !== "POST" || path !== "/api/messages") {
    return sendJson(res, 404, { error: "Not found." });
  }
  if (!(req.headers["content-type"] ?? "").startsWith("application/json")) {
    return sendJson(res, 415, { error: "Send the message as application/json." });
  }
  const chunks = [];
  let size = 0;
  let tooLarge = false;
  req.on("data", (chunk) => {
    size += chunk.length;
    if (size > MAX_BODY_BYTES) tooLarge = true;
    else chunks.push(chunk);
  });
  req.on("end", () => {
    if (tooLarge) return sendJson(res, 413, { error: "The body is over 16 KiB." });
    let body;
    try {
      body = JSON.parse(Buffer.concat(chunks).toString("utf8"));
    } catch {
      return sendJson(res, 400, { error: "The body is not valid JSON." });
    }
    const v = validate(body);
    if (v.error) return sendJson(res, 400, v);

    if (v.clientId && seen.has(v.clientId)) {
      return sendJson(res, 200, { message: seen.get(v.clientId) });
    }
    const message = {
      id: v.clientId ?? randomUUID(),
      room: v.room,
      author: v.author,
      text: v.text,
      sent_at: new Date().toISOString(),
    };
    if (v.clientId) {
      seen.set(v.clientId, message);
      if (seen.size > SEEN_LIMIT) seen.delete(seen.keys().next().value);
    }
    io.to(message.room).emit("message", message);
    sendJson(res, 201, { message });
  });
});

const io = new Server(httpServer);

io.on("connection", (socket) => {
  const room = socket.handshake.query.room;
  socket.join(typeof room === "string" && ROOM_RE.test(room) ? room : "lobby");
});

httpServer.listen(port, host, () => {
  const addr = httpServer.address();
  console.log(`socketio-peer listening on http://${addr.address}:${addr.port}`);
});

const stop = () => io.close(() => process.exit(0));
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
