'use strict';
// Tailor (npm node-tailor 3.9.2) serving the benchmark templates, for bench/run.py:
//   node bench/tailor_server.js PORT TEMPLATES_DIR
// GET /<name> composes TEMPLATES_DIR/<name>.html. Templates are cached in memory: a custom
// `fetchTemplate` parses each template once and returns the cached parse on every later
// request — Tailor's best case (its default loader re-reads and re-parses per request).
// Everything else is Tailor's default: header allowlist, pipe definition, maxAssetLinks 1,
// Node 20's global keep-alive agent for fragment requests.
//
// GET /__stats (answered before Tailor) returns JSON counts of Tailor's `error` and
// `fragment:error` / `fragment:warn` / `fragment:fallback` events since start, so the runner
// can tell a fast page from a page with fragments missing. The first few are logged to stderr.
// Prints "ready PORT" once listening. Needs node-tailor installed next to this file
// (bench/node_modules), which bench/run.py does.

const fs = require('fs');
const http = require('http');
const path = require('path');
const Tailor = require('node-tailor');
const { TEMPLATE_NOT_FOUND } = require('node-tailor/lib/fetch-template');

const port = Number(process.argv[2] || 8091);
const templatesDir = path.resolve(process.argv[3] || path.join(__dirname, 'templates'));

const cache = new Map(); // template name -> Promise of the parsed template (never re-parsed)

function notFound() {
    const err = new Error('template not found');
    err.code = TEMPLATE_NOT_FOUND;
    err.presentable = 'template not found';
    return Promise.reject(err);
}

function fetchTemplate(request, parseTemplate) {
    const q = request.url.indexOf('?');
    const name = (q < 0 ? request.url : request.url.slice(0, q)).slice(1);
    let parsed = cache.get(name);
    if (parsed === undefined) {
        if (!/^[A-Za-z0-9_-]+$/.test(name)) return notFound();
        let text;
        try {
            text = fs.readFileSync(path.join(templatesDir, `${name}.html`), 'utf-8');
        } catch (e) {
            return notFound();
        }
        parsed = parseTemplate(text);
        cache.set(name, parsed);
    }
    return parsed;
}

const stats = { error: 0, 'fragment:error': 0, 'fragment:warn': 0, 'fragment:fallback': 0 };
let logged = 0;
const tailor = new Tailor({ fetchTemplate });
for (const event of Object.keys(stats)) {
    tailor.on(event, (request, a, b) => {
        stats[event] += 1;
        if (logged < 20) {
            logged += 1;
            const what = event === 'error' ? a : b;
            const id = event === 'error' ? '' : ` ${a && a.id}`;
            console.error(`tailor ${event} ${request.url}${id}: ${what && what.message ? what.message : what}`);
        }
    });
}

const server = http.createServer((req, res) => {
    if (req.url === '/__stats') {
        res.writeHead(200, { 'Content-Type': 'application/json' });
        res.end(JSON.stringify(stats));
        return;
    }
    tailor.requestHandler(req, res);
});
server.keepAliveTimeout = 75000;
server.headersTimeout = 76000;
server.requestTimeout = 0;
server.listen(port, '127.0.0.1', () => console.log(`ready ${port}`));

const stop = () => server.close(() => process.exit(0)) && setTimeout(() => process.exit(0), 1000).unref();
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
