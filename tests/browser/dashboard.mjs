// Drives the operator's web dashboard in Debian's chromium (headless) through playwright-core,
// against the seeded operator of operator/tests/dashboard.rs (queue team/emails: 3 dead letters
// bad-1..3, 1 delayed job, ok-1 completed).
//
//   node tests/browser/dashboard.mjs <dashboard URL> <write token> <screenshot directory>
//
// Checks the queues page's figures, opens a dead letter, is refused a requeue without the
// token, requeues with it, finds a job by id; saves a screenshot of each page. Exits non-zero,
// saying what it expected, on the first failed check.
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [url, token, shots] = process.argv.slice(2);
if (!url || !token || !shots) {
  console.error("usage: node dashboard.mjs <dashboard URL> <write token> <screenshot directory>");
  process.exit(2);
}
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const TIMEOUT = 20_000;

mkdirSync(shots, { recursive: true });
const browser = await chromium.launch({ executablePath, headless: true, args: ["--no-sandbox"] });
let failed = false;
const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
try {
  page.setDefaultTimeout(TIMEOUT);
  const problems = [];
  page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
  page.on("console", (message) => {
    if (message.type() === "error" && !message.text().includes("403")) problems.push(`console: ${message.text()}`);
  });
  const shot = (name) => page.screenshot({ path: join(shots, `${name}.png`), fullPage: true });
  const expectText = async (selector, expected) => {
    const locator = page.locator(selector);
    await locator.waitFor();
    try {
      await page.waitForFunction(
        ([s, e]) => document.querySelector(s)?.textContent.includes(e),
        [selector, expected],
        { timeout: TIMEOUT },
      );
    } catch (_) {
      throw new Error(`${selector} shows ${JSON.stringify(await locator.textContent())}, expected ${JSON.stringify(expected)}`);
    }
  };

  // Queues: the figures of the queue's status.
  await page.goto(`${url}#/queues`);
  const emails = 'tr[data-queue="team/emails"]';
  await expectText(`${emails} td[data-field="deadLettered"]`, "3");
  await expectText(`${emails} td[data-field="delayed"]`, "1");
  await expectText(`${emails} td[data-field="pending"]`, "0");
  await expectText(`${emails} td:last-child`, "Ready=True");
  await expectText("#mode", "writes need the token");
  await shot("queues");

  // Workers.
  await page.click('nav a[data-view="workers"]');
  await expectText('tr[data-worker="team/emails"] td:nth-child(2)', "emails");
  await shot("workers");

  // One queue, then its dead letters, then one of them.
  await page.click('nav a[data-view="queues"]');
  await page.click(`${emails} td:first-child a`);
  await expectText("#figures", "Dead letters");
  await page.locator("#charts svg#chart-backlog polyline").first().waitFor({ state: "attached" });
  await expectText("#charts", "Submitted/s and finished/s");
  await shot("queue");
  // Its pending jobs (none: the worker keeps up) and its delayed one.
  await page.click('a:has-text("Peek pending jobs")');
  await expectText("#view", "No pending job at this level");
  await page.goto(`${url}#/queue/team/emails`);
  await page.click('a:has-text("Delayed jobs")');
  await expectText('tr[data-job="later-1"] td[data-field="runAt"]', "@at ");
  await shot("delayed");
  await page.goto(`${url}#/queue/team/emails`);
  await page.click('a:has-text("Browse dead letters")');
  await expectText('tr[data-job="bad-1"]', "card declined");
  await shot("dead-letters");
  await page.click('tr[data-job="bad-1"] td:first-child a');
  await expectText("#payload", "bad-1@example.com");
  await expectText('#dead-letter dd[data-field="Reason"]', "permanent");
  await shot("dead-letter");

  // A requeue without the token is refused; with it, it goes through.
  await page.click("#requeue");
  await expectText("#outcome", "no valid token");
  await page.fill("#token", token);
  await page.dispatchEvent("#token", "change");
  await page.click("#requeue");
  await expectText("#outcome", "Requeued: bad-1");

  // Where is job ok-1?
  await page.click('nav a[data-view="job"]');
  await page.fill('#find input[name="queue"]', "team/emails");
  await page.fill('#find input[name="id"]', "ok-1");
  await page.click('#find button[type="submit"]');
  await page.locator('#job-state[data-state="completed"]').waitFor();
  await expectText("#payload", "sent:");
  await shot("job");

  if (problems.length > 0) throw new Error(problems.join("\n"));
  console.log(`dashboard checks passed; screenshots in ${shots}`);
} catch (error) {
  failed = true;
  console.error(`dashboard browser test failed: ${error.message}`);
  console.error(`at ${page.url()}, showing:\n${await page.locator("main").innerText().catch(() => "?")}`);
  await page.screenshot({ path: join(shots, "failure.png"), fullPage: true }).catch(() => {});
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
