'use strict';
// A fast fragment server for benchmarks, on Node's own `http` module (no dependencies):
//   GET /f/<name>?delay=<ms>&size=<bytes>
// The same answers as bench/fragment_server.py: `<div class="NAME">xxx…</div>\n` of `size`
// bytes (default 1024) after `delay` ms, with a `Link` header declaring one stylesheet and one
// fragment script. Anything else is a 404. Keep-alive connections stay open 75 s (aiohttp's
// default), so proxies' pooled connections are not cut between benchmark rows. It listens with a
// backlog of 4,096 (the kernel's somaxconn; Node's default is 511): a proxy opening hundreds of
// connections at once (page100) must not find them dropped here, each then waiting a 1 s
// SYN-ACK retransmit — the fragment service's limit, not the proxy's, in every system's p99.
//
// With a PAGES_DIR, it also answers GET /p/<name> with PAGES_DIR/<name>.html (text/html, read
// once): the page templates Varnish (bench/run.py's ESI peer) fetches from its backend.
//
// Run: node bench/fragment_server.js PORT [PAGES_DIR]   (prints "ready PORT" once listening)

const fs = require('fs');
const http = require('http');
const nodePath = require('path');

const port = Number(process.argv[2] || 9800);
const pagesDir = process.argv[3];
const pages = new Map(); // name -> Buffer
const bodies = new Map(); // "name size" -> Buffer; at most a few hundred distinct keys in a run

function body(name, size) {
    const key = `${name} ${size}`;
    let buf = bodies.get(key);
    if (buf === undefined) {
        buf = Buffer.from(`<div class="${name}">${'x'.repeat(Math.max(0, size - 30))}</div>\n`);
        if (bodies.size < 10000) bodies.set(key, buf);
    }
    return buf;
}

function intParam(query, key, fallback) {
    const m = new RegExp(`(?:^|&)${key}=(\\d+)`).exec(query);
    return m ? Number(m[1]) : fallback;
}

function answer(res, name, size) {
    const buf = body(name, size);
    res.writeHead(200, {
        'Content-Type': 'text/html; charset=utf-8',
        'Content-Length': buf.length,
        Link: `</assets/${name}.css>; rel="stylesheet", </assets/${name}.js>; rel="fragment-script"`,
    });
    res.end(buf);
}

const server = http.createServer((req, res) => {
    const q = req.url.indexOf('?');
    const path = q < 0 ? req.url : req.url.slice(0, q);
    const query = q < 0 ? '' : req.url.slice(q + 1);
    if (pagesDir && /^\/p\/[A-Za-z0-9_-]+$/.test(path)) {
        const name = path.slice(3);
        let buf = pages.get(name);
        if (buf === undefined) {
            try {
                buf = fs.readFileSync(nodePath.join(pagesDir, `${name}.html`));
            } catch (e) {
                buf = null;
            }
            pages.set(name, buf);
        }
        if (buf !== null) {
            res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8', 'Content-Length': buf.length });
            res.end(buf);
            return;
        }
    }
    if (!path.startsWith('/f/') || path.length <= 3 || path.indexOf('/', 3) >= 0) {
        res.writeHead(404, { 'Content-Type': 'text/plain' });
        res.end('not found\n');
        return;
    }
    const name = decodeURIComponent(path.slice(3)).replace(/[^A-Za-z0-9_-]/g, '_');
    const delay = intParam(query, 'delay', 0);
    const size = Math.min(intParam(query, 'size', 1024), 10 * 1024 * 1024);
    if (delay > 0) setTimeout(answer, delay, res, name, size);
    else answer(res, name, size);
});
server.keepAliveTimeout = 75000;
server.headersTimeout = 76000;
server.requestTimeout = 0;
server.listen({ port, host: '127.0.0.1', backlog: 4096 }, () => console.log(`ready ${port}`));

const stop = () => server.close(() => process.exit(0)) && setTimeout(() => process.exit(0), 1000).unref();
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
