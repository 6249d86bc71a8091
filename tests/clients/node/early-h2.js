// Node's http2 client uploading a photo to the gateway over TLS, for tests/early_answers.rs:
// `count` uploads on one connection (one after another, or all at once), one line per call:
//   ANSWER h2 <status> <Retry-After or -> <body on one line>
//   FAILED <error code>: <message>
//
// Usage: node early-h2.js PORT CA_PEM PHOTO KEY COUNT serial|parallel
'use strict';
const fs = require('fs');
const http2 = require('http2');
const tls = require('tls');

const [port, caFile, photoFile, key, countArg, mode] = process.argv.slice(2);
const ca = fs.readFileSync(caFile);
const photo = fs.readFileSync(photoFile);
const boundary = '----lgnodeboundary' + Date.now();
const body = Buffer.concat([
  Buffer.from(`--${boundary}\r\nContent-Disposition: form-data; name="image"; filename="face.jpg"\r\nContent-Type: image/jpeg\r\n\r\n`),
  photo,
  Buffer.from(`\r\n--${boundary}--\r\n`),
]);

const session = http2.connect(`https://localhost:${port}`, {
  createConnection: () =>
    tls.connect({ host: '127.0.0.1', port: Number(port), ca, servername: 'localhost', ALPNProtocols: ['h2'] }),
});
session.on('error', () => {});

function call() {
  return new Promise((resolve) => {
    const req = session.request({
      ':method': 'POST',
      ':path': '/api/v1/backend/liveness/short/',
      authorization: `Bearer ${key}`,
      'content-type': `multipart/form-data; boundary=${boundary}`,
      'content-length': String(body.length),
    });
    let status = 0;
    let retry = '-';
    const chunks = [];
    req.on('response', (h) => {
      status = h[':status'];
      retry = h['retry-after'] || '-';
    });
    req.on('data', (c) => chunks.push(c));
    req.on('end', () =>
      resolve(`ANSWER h2 ${status} ${retry} ${Buffer.concat(chunks).toString().replace(/\n/g, ' ')}`));
    req.on('error', (e) => resolve(`FAILED ${e.code}: ${e.message}`));
    req.end(body);
  });
}

(async () => {
  const count = Number(countArg);
  let lines;
  if (mode === 'parallel') {
    lines = await Promise.all(Array.from({ length: count }, call));
  } else {
    lines = [];
    for (let i = 0; i < count; i++) lines.push(await call());
  }
  for (const l of lines) console.log(l);
  session.close();
})();
