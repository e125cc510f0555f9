// Node smoke test for the generated TypeScript stubs: calls Recommend on a running bundlerec server and
// reads the stream to its summary.
//
//   node dist/smoke.js HOST:PORT [QUERY] [MAX_BUNDLES]
//
// Prints one line per bundle ("bundle 1 score=... items=3 anchor=...") and a final
// "summary bundles_sent=N stop_reason=STOP_REASON_..." line. Exits 0 only when the stream ended with a
// summary that counts the bundles received; 1 when it did not, 2 when the call failed.
import { credentials } from "@grpc/grpc-js";

import { BundleRecommenderClient, RecommendRequest, type RecommendResponse, stopReasonToJSON } from "./gen/bundlerec/v1/bundlerec";

async function main(argv: string[]): Promise<number> {
  const [target = "localhost:50051", query = "organic", maxBundles = "3"] = argv;
  const client = new BundleRecommenderClient(target, credentials.createInsecure());
  const request = RecommendRequest.fromPartial({ query, maxBundles: Number(maxBundles) });
  const call = client.recommend(request, { deadline: new Date(Date.now() + 15_000) });
  let bundles = 0;
  let summaryOk = false;
  try {
    for await (const raw of call) {
      const payload = (raw as RecommendResponse).payload;
      if (summaryOk) {
        console.error("message after the summary");
        return 1;
      }
      if (payload?.$case === "bundle") {
        const b = payload.value;
        bundles += 1;
        const anchor = b.items[0];
        console.log(`bundle ${b.rank} score=${b.score.toFixed(4)} items=${b.items.length} anchor=${JSON.stringify(anchor?.title ?? "")}`);
      } else if (payload?.$case === "summary") {
        const s = payload.value;
        console.log(
          `summary bundles_sent=${s.bundlesSent} stop_reason=${stopReasonToJSON(s.stopReason)} ` +
            `artifact=${s.artifactVersion} server_ms=${s.serverMs.toFixed(1)}`,
        );
        if (s.bundlesSent !== bundles) {
          console.error(`summary counts ${s.bundlesSent} bundles, received ${bundles}`);
          return 1;
        }
        summaryOk = true;
      } else {
        console.error("message with neither a bundle nor a summary");
        return 1;
      }
    }
  } catch (err) {
    const e = err as { code?: number; details?: string; message?: string };
    console.error(`Recommend failed: code=${e.code ?? "?"} ${e.details ?? e.message ?? String(err)}`);
    return 2;
  } finally {
    client.close();
  }
  if (!summaryOk) {
    console.error("stream ended without a summary");
    return 1;
  }
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err) => {
    console.error(err);
    process.exit(2);
  },
);
