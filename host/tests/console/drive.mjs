// Drives the admin console in a real Chromium against a running host (started by
// `tests/all/console.rs`, which passes everything through the environment): sees the services,
// swaps a component file and sees its generation change, rolls it back with the button,
// poisons a record, swaps in a fixed handler, replays the dead letter from the page, and saves
// a screenshot. Exits non-zero, with the reason, at the first thing that does not happen.
import assert from "node:assert/strict";
import { copyFileSync, renameSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const env = (name) => {
  const value = process.env[name];
  assert.ok(value, `${name} is not set`);
  return value;
};
const { chromium } = await import(pathToFileURL(join(env("PLAYWRIGHT_CORE"), "index.mjs")).href);
const consoleUrl = env("CONSOLE_URL");
const components = env("COMPONENTS");
const WAIT = 60_000;

// Replaces a component file the way a deploy does: a new file renamed over the old one.
function swap(service, from) {
  const target = join(components, `${service}.wasm`);
  copyFileSync(from, `${target}.new`);
  renameSync(`${target}.new`, target);
}

async function until(what, check) {
  const deadline = Date.now() + WAIT;
  for (;;) {
    const value = await check();
    if (value) return value;
    assert.ok(Date.now() < deadline, `timed out: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

const browser = await chromium.launch({
  executablePath: env("CHROMIUM"),
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(e.message));
  await page.goto(consoleUrl);

  // Every service of the manifest is listed, live.
  for (const name of ["gateway", "user", "product", "order"]) {
    await page.locator(`#services tr[data-service="${name}"]`).waitFor({ timeout: WAIT });
  }
  await page.locator("#connection.ok").waitFor({ timeout: WAIT });
  const product = page.locator('#services tr[data-service="product"]');
  const read = async (row) => ({
    generation: Number(await row.getAttribute("data-generation")),
    sha256: await row.getAttribute("data-sha256"),
  });
  const first = await read(product);

  // A new file: the page shows the next generation and another digest.
  swap("product", env("SWAP_IN"));
  const swapped = await until("product's new generation on the page", async () => {
    const now = await read(product);
    return now.generation > first.generation ? now : null;
  });
  assert.notEqual(swapped.sha256, first.sha256);

  // The button rolls it back: the first digest again, one generation later.
  await product.locator('button[data-action="rollback"]').click();
  const back = await until("product rolled back on the page", async () => {
    const now = await read(product);
    return now.generation > swapped.generation ? now : null;
  });
  assert.equal(back.sha256, first.sha256, "rolled back to the first version");
  await page.locator("#notice", { hasText: "rolled back" }).waitFor({ timeout: WAIT });

  // A record order-service cannot take (not a user): dead-lettered at once.
  const sent = await fetch(`${env("USER_URL")}/send?topic=user-created&key=p1&event=poison-1`, {
    method: "POST",
    body: "this is not a user",
  });
  assert.equal(sent.status, 202, await sent.text());
  await page.selectOption("#dlq-topic", "user-created");
  const poisoned = page.locator('#dead-letters tr[data-event="poison-1"]');
  await poisoned.waitFor({ timeout: WAIT });
  assert.match(await poisoned.innerText(), /payload is not a CachedUser/);
  assert.match(await poisoned.innerText(), /this is not a user/);

  // The fix: a handler that takes it. Once the page shows it loaded, replay from the page.
  const order = page.locator('#services tr[data-service="order"]');
  const before = await read(order);
  swap("order", env("FIXED_HANDLER"));
  await until("order's fixed handler on the page", async () => (await read(order)).generation > before.generation);
  await poisoned.locator("button").click();
  await page.locator("#notice", { hasText: "replayed 1 to user-created" }).waitFor({ timeout: WAIT });
  await page.locator("#dlq-topic option", { hasText: "user-created.dlq (1)" }).waitFor({ state: "attached", timeout: WAIT });
  await until("the replayed record handled by the fixed handler", async () => {
    const r = await fetch(`${env("ORDER_URL")}/deliveries/poison-1`);
    return r.ok && (await r.json()).count === 1;
  });

  await page.screenshot({ path: env("SCREENSHOT"), fullPage: true });
  assert.deepEqual(pageErrors, [], "the page threw");
  console.log("console: services, swap, rollback, dead letter and replay all seen");
} finally {
  await browser.close();
}
