#!/usr/bin/env node
// ws-broadcast.js - the Node peer of herald's fan-out benchmark: a pub/sub broadcast server on the
// `ws` package with herald's URL layout.
//
//   WebSocket /sub/<channel>        subscribe (several channels: /sub/a,b,c, like nchan's multiplexing)
//   POST      /pub/<channel>        publish the body to the channel's subscribers; replies 200
//                                   {"channel":"c","seq":n,"subscribers":k}
//   GET       /stats                {"connections":n,"channels":n,"messages_in":n,"messages_out":n}
//
// Fan-out is written the way ws users write it: the body is read into one Buffer and each
// subscriber gets client.send(body, { binary }) (ws frames it per socket; no permessage-deflate).
//
// usage: node ws-broadcast.js [--port 8080] [--host 127.0.0.1]
'use strict';

const http = require('http');
const { WebSocketServer, WebSocket } = require('ws');
const { isUtf8 } = require('buffer');

let port = 8080;
let host = '127.0.0.1';
for (let i = 2; i < process.argv.length; i++) {
  if (process.argv[i] === '--port') port = Number(process.argv[++i]);
  else if (process.argv[i] === '--host') host = process.argv[++i];
  else {
    console.error('usage: node ws-broadcast.js [--port N] [--host ADDR]');
    process.exit(2);
  }
}

const channels = new Map(); // name -> { subs: Set<WebSocket>, seq: number }
const stats = { connections: 0, messages_in: 0, messages_out: 0 };

function channel(name) {
  let ch = channels.get(name);
  if (!ch) {
    ch = { subs: new Set(), seq: 0 };
    channels.set(name, ch);
  }
  return ch;
}

function channelNames(url, prefix) {
  const path = url.split('?')[0];
  if (!path.startsWith(prefix) || path.length === prefix.length) return null;
  return decodeURIComponent(path.slice(prefix.length)).split(',').filter((s) => s.length > 0);
}

const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false, maxPayload: 1 << 20 });

const server = http.createServer((req, res) => {
  if (req.method === 'POST' && req.url.startsWith('/pub/')) {
    const names = channelNames(req.url, '/pub/');
    if (!names || names.length !== 1) {
      res.writeHead(400).end('bad channel\n');
      return;
    }
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const body = chunks.length === 1 ? chunks[0] : Buffer.concat(chunks);
      const ch = channel(names[0]);
      const binary = !isUtf8(body);
      ch.seq++;
      stats.messages_in++;
      for (const client of ch.subs) {
        if (client.readyState === WebSocket.OPEN) {
          client.send(body, { binary });
          stats.messages_out++;
        }
      }
      const reply = JSON.stringify({ channel: names[0], seq: ch.seq, subscribers: ch.subs.size });
      res.writeHead(200, { 'Content-Type': 'application/json' }).end(reply);
    });
    return;
  }
  if (req.method === 'GET' && req.url === '/stats') {
    const body = JSON.stringify({ connections: stats.connections, channels: channels.size,
      messages_in: stats.messages_in, messages_out: stats.messages_out,
      rss: process.memoryUsage().rss });
    res.writeHead(200, { 'Content-Type': 'application/json' }).end(body);
    return;
  }
  res.writeHead(404).end('not found\n');
});
server.keepAliveTimeout = 60000;
server.headersTimeout = 65000;
server.requestTimeout = 0;

server.on('upgrade', (req, socket, head) => {
  const names = channelNames(req.url, '/sub/');
  if (!names || names.length === 0) {
    socket.end('HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\n');
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => {
    stats.connections++;
    const subs = names.map((n) => channel(n).subs);
    for (const s of subs) s.add(ws);
    ws.on('close', () => {
      stats.connections--;
      for (const s of subs) s.delete(ws);
    });
    ws.on('error', () => {});
  });
});

server.listen(port, host, () => {
  console.error(`ws-broadcast: listening on ${host}:${port} (node ${process.version})`);
});

for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => process.exit(0));
}
