// Drives the page of `python -m runtime web` in headless Chromium (Debian's `chromium`, through
// puppeteer-core: no browser download), one greedy generation per prompt, and optionally saves a
// screenshot after the last one.
// usage: node web_page.mjs [--sample=T,K,SEED] URL GRAPH[,GRAPH...] MAX_NEW_TOKENS SCREENSHOT_PNG|- PROMPT [PROMPT...]
// (greedy unless --sample gives temperature, top-k and seed)
// prints one JSON line: a list of the page's window.lastResult, one per graph and prompt
import puppeteer from 'puppeteer-core';

const argv = process.argv.slice(2);
const sample = argv[0]?.startsWith('--sample=') ? argv.shift().slice('--sample='.length).split(',') : null;
const [url, graphs, maxNew, shot, ...prompts] = argv;
const executablePath = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const browser = await puppeteer.launch({
  executablePath,
  headless: true,
  // no sandbox: CI containers run as root, where Chromium's sandbox cannot start
  args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-extensions'],
});
const results = [];
try {
  const page = await browser.newPage();
  await page.setViewport({ width: 900, height: 640, deviceScaleFactor: 1 });
  const logs = [];
  page.on('console', (m) => logs.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => logs.push(`pageerror: ${e.message}`));
  await page.goto(url, { waitUntil: 'load' });
  await page.waitForFunction(() => ['ready', 'error'].includes(document.body.dataset.state), { timeout: 120000 });
  if (await page.evaluate(() => document.body.dataset.state) === 'error') {
    throw new Error(`the page failed to load: ${await page.$eval('#status', (e) => e.textContent)}\n${logs.join('\n')}`);
  }
  for (const graph of graphs.split(',')) for (const prompt of prompts) {
    await page.select('#graph', graph);
    await page.$eval('#prompt', (e, v) => { e.value = v; }, prompt);
    await page.$eval('#max', (e, v) => { e.value = v; }, maxNew);
    await page.click(`input[name=mode][value=${sample ? 'sample' : 'greedy'}]`);
    if (sample) {
      for (const [id, v] of [['temperature', sample[0]], ['topk', sample[1]], ['seed', sample[2]]]) {
        await page.$eval(`#${id}`, (e, x) => { e.value = x; }, v);
      }
    }
    await page.click('#go');
    await page.waitForFunction(() => document.body.dataset.state === 'done', { timeout: 120000 });
    results.push(await page.evaluate(() => window.lastResult));
    await page.evaluate(() => { document.body.dataset.state = 'ready'; });
  }
  if (shot !== '-') await page.screenshot({ path: shot, fullPage: true });
  if (results.some((r) => r.error)) console.error(logs.join('\n'));
} finally {
  await browser.close();
}
console.log(JSON.stringify(results));
