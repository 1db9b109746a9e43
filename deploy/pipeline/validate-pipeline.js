#!/usr/bin/env node
// Validates Azure Pipelines YAML files with Microsoft's own validator, the npm package
// azure-pipelines-language-service (the one behind the Azure Pipelines VS Code extension), against the
// pipeline schema that extension ships (vendored in schema/, see schema/README.md).
//
//   node deploy/pipeline/validate-pipeline.js azure-pipelines.yml azure-pipelines-model.yml
//   node deploy/pipeline/validate-pipeline.js --schema other-schema.json pipeline.yml
//
// Prints one JSON document on stdout: the schema used and, per file, its diagnostics
// ({severity, line, character, message}; line and character count from 1). Exit 0 when no file has a
// problem, 1 when one has, 2 on bad arguments or an unreadable file or schema. A problem is an error or a
// warning: the library reports YAML syntax errors as errors but every schema violation (unknown key, wrong
// type, missing task input) as a warning (an editor's squiggle), and Azure Pipelines refuses to run a file
// with either. Hints (deprecated keys) are printed and do not fail.
'use strict';

const fs = require('fs');
const path = require('path');
const { pathToFileURL } = require('url');

const DEFAULT_SCHEMA = path.join(__dirname, 'schema', 'service-schema-v1.261.1.json');
const SEVERITIES = { 1: 'error', 2: 'warning', 3: 'information', 4: 'hint' };
const PROBLEMS = new Set(['error', 'warning']);
const USAGE = 'usage: validate-pipeline.js [--schema SCHEMA.json] PIPELINE.yml...';

function fail(message) {
  process.stderr.write(`validate-pipeline: ${message}\n`);
  process.exit(2);
}

function parseArguments(argv) {
  let schemaPath = DEFAULT_SCHEMA;
  const files = [];
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--schema') {
      if (i + 1 >= argv.length) fail(`--schema needs a file\n${USAGE}`);
      schemaPath = argv[++i];
    } else if (argv[i] === '-h' || argv[i] === '--help') {
      process.stdout.write(`${USAGE}\n`);
      process.exit(0);
    } else if (argv[i].startsWith('-')) {
      fail(`unknown option ${argv[i]}\n${USAGE}`);
    } else {
      files.push(argv[i]);
    }
  }
  if (files.length === 0) fail(`no pipeline file given\n${USAGE}`);
  return { schemaPath, files };
}

function readText(file, what) {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch (error) {
    return fail(`cannot read ${what} ${file}: ${error.message}`);
  }
}

async function main() {
  const { schemaPath, files } = parseArguments(process.argv.slice(2));
  let service;
  try {
    service = require('azure-pipelines-language-service');
  } catch (error) {
    fail(`azure-pipelines-language-service is not installed (run npm ci in the repository): ${error.message}`);
  }
  let schema;
  try {
    schema = JSON.parse(readText(schemaPath, 'schema'));
  } catch (error) {
    fail(`schema ${schemaPath} is not JSON: ${error.message}`);
  }
  // The library logs its schema lookups with console.log; stdout carries only our JSON.
  console.log = () => {};

  const schemaUri = pathToFileURL(path.resolve(schemaPath)).href;
  // The schema is given inline, so nothing is ever fetched: any other request is a broken schema.
  const refuseRequest = (uri) => Promise.reject(new Error(`schema ${uri} is not available offline`));
  const languageService = service.getLanguageService(refuseRequest, [], undefined);
  languageService.configure({ validate: true, schemas: [{ uri: schemaUri, fileMatch: ['*'], schema }] });

  const results = [];
  for (const file of files) {
    const text = readText(file, 'pipeline');
    const uri = pathToFileURL(path.resolve(file)).href;
    const document = service.TextDocument.create(uri, 'azure-pipelines', 1, text);
    const diagnostics = await languageService.doValidation(document, service.parse(text));
    results.push({
      file,
      diagnostics: diagnostics.map((d) => ({
        severity: SEVERITIES[d.severity] || String(d.severity),
        line: d.range.start.line + 1,
        character: d.range.start.character + 1,
        message: d.message,
      })),
    });
  }
  const output = {
    validator: `azure-pipelines-language-service ${require('azure-pipelines-language-service/package.json').version}`,
    schema: { file: schemaPath, version: schema.$comment || null },
    files: results,
  };
  process.stdout.write(`${JSON.stringify(output, null, 2)}\n`);
  const problems = results.some((r) => r.diagnostics.some((d) => PROBLEMS.has(d.severity)));
  process.exitCode = problems ? 1 : 0;
}

main().catch((error) => {
  process.stderr.write(`validate-pipeline: ${error.stack || error}\n`);
  process.exit(2);
});
