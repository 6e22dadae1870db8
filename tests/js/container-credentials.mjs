// Run inside a sandbox Pod by tests/token_sdk.rs with only
// AWS_CONTAINER_CREDENTIALS_FULL_URI and AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE
// set: the JavaScript SDK v3's default chain finds the container credentials
// endpoint (kiam's agent) on its own, then asks STS (argv[2]) who it is.
import { fromNodeProviderChain } from "@aws-sdk/credential-providers";
import { GetCallerIdentityCommand, STSClient } from "@aws-sdk/client-sts";

const [endpoint] = process.argv.slice(2);
if (!endpoint) {
  console.error("usage: node container-credentials.mjs <sts endpoint url>");
  process.exit(2);
}
const credentials = await fromNodeProviderChain()();
const sts = new STSClient({ region: "us-east-1", endpoint, credentials });
const identity = await sts.send(new GetCallerIdentityCommand({}));
console.log(
  JSON.stringify({
    accessKeyId: credentials.accessKeyId,
    accountId: credentials.accountId,
    arn: identity.Arn,
  }),
);
