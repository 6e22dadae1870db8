package kiam;

import java.util.Optional;
import software.amazon.awssdk.auth.credentials.AwsCredentials;
import software.amazon.awssdk.auth.credentials.AwsCredentialsProvider;
import software.amazon.awssdk.auth.credentials.AwsSessionCredentials;
import software.amazon.awssdk.auth.credentials.ContainerCredentialsProvider;
import software.amazon.awssdk.auth.credentials.InstanceProfileCredentialsProvider;

/**
 * Resolves credentials with one AWS SDK for Java v2 provider, as an application in a Pod would,
 * and prints one JSON line: {"provider", "access_key_id", "account_id", "has_session_token"}.
 * Exits 1 with the error on stderr when the provider fails.
 *
 * <p>{@code imds}: InstanceProfileCredentialsProvider (IMDSv2 first, IMDSv1 when the token
 * request fails unless AWS_EC2_METADATA_V1_DISABLED=true). {@code container}:
 * ContainerCredentialsProvider (AWS_CONTAINER_CREDENTIALS_FULL_URI and
 * AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE from the environment). Run by
 * tests/e2e_sdk_go_java.rs inside a Pod's network namespace.
 */
public final class SdkClient {
  private SdkClient() {}

  public static void main(String[] args) {
    String mode = args.length > 0 ? args[0] : "imds";
    AwsCredentialsProvider provider;
    switch (mode) {
      case "imds":
        provider = InstanceProfileCredentialsProvider.create();
        break;
      case "container":
        provider = ContainerCredentialsProvider.create();
        break;
      default:
        System.err.println("usage: SdkClient imds|container");
        System.exit(64);
        return;
    }
    try {
      AwsCredentials creds = provider.resolveCredentials();
      Optional<String> account = creds.accountId();
      System.out.println(
          "{\"provider\":" + quote(provider.getClass().getSimpleName())
              + ",\"access_key_id\":" + quote(creds.accessKeyId())
              + ",\"account_id\":" + (account.isPresent() ? quote(account.get()) : "null")
              + ",\"has_session_token\":" + (creds instanceof AwsSessionCredentials)
              + "}");
    } catch (RuntimeException e) {
      System.err.println("error: " + e);
      System.exit(1);
    }
  }

  /** A JSON string; the values printed are ids, but quote them properly anyway. */
  private static String quote(String s) {
    StringBuilder b = new StringBuilder("\"");
    for (char c : s.toCharArray()) {
      if (c == '"' || c == '\\') {
        b.append('\\').append(c);
      } else if (c < 0x20) {
        b.append(String.format("\\u%04x", (int) c));
      } else {
        b.append(c);
      }
    }
    return b.append('"').toString();
  }
}
