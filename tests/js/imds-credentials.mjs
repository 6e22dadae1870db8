// Run inside a sandbox Pod by tests/e2e_sdk.rs, with no AWS configuration:
// the JavaScript SDK v3 gets the Pod's credentials from the instance
// metadata service at 169.254.169.254, then asks STS (argv[2]) who it is.
import { fromInstanceMetadata } from "@aws-sdk/credential-providers";
import { GetCallerIdentityCommand, STSClient } from "@aws-sdk/client-sts";

const [endpoint] = process.argv.slice(2);
if (!endpoint) {
  console.error("usage: node imds-credentials.mjs <sts endpoint url>");
  process.exit(2);
}
// The SDK's defaults: 1s timeout, IMDSv2 token first.
const credentials = await fromInstanceMetadata()();
const sts = new STSClient({ region: "us-east-1", endpoint, credentials });
const identity = await sts.send(new GetCallerIdentityCommand({}));
console.log(
  JSON.stringify({
    accessKeyId: credentials.accessKeyId,
    expiration: credentials.expiration,
    arn: identity.Arn,
  }),
);
