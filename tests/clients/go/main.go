// A tiny program that uses the AWS SDK for Go v2 exactly as an application
// in a Pod would: the default credential chain, and the IMDS client for the
// role name and iam/info. It prints one JSON object on stdout and exits 0,
// or prints the error on stderr and exits 1. Built and run by
// tests/e2e_sdk_go_java.rs inside a Pod's network namespace; it is given no
// AWS configuration, so the chain reaches the instance metadata service
// (through kiam's agent).
//
// Which IMDS version it uses is up to the SDK: IMDSv2 first, falling back
// to IMDSv1 when the token request fails, unless AWS_EC2_METADATA_V1_DISABLED
// is set (then IMDSv2 only).
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/feature/ec2/imds"
	"github.com/aws/aws-sdk-go-v2/service/sts"
)

type result struct {
	AccessKeyID        string `json:"access_key_id"`
	Source             string `json:"source"`
	Expires            string `json:"expires"`
	Role               string `json:"role"`
	InstanceProfileArn string `json:"instance_profile_arn"`
	InfoError          string `json:"info_error,omitempty"`
	Arn                string `json:"arn,omitempty"`
}

func run(ctx context.Context, stsEndpoint string) (*result, error) {
	cfg, err := config.LoadDefaultConfig(ctx)
	if err != nil {
		return nil, fmt.Errorf("loading the default config: %w", err)
	}
	creds, err := cfg.Credentials.Retrieve(ctx)
	if err != nil {
		return nil, fmt.Errorf("retrieving credentials: %w", err)
	}
	out := &result{
		AccessKeyID: creds.AccessKeyID,
		Source:      creds.Source,
	}
	if creds.CanExpire {
		out.Expires = creds.Expires.UTC().Format(time.RFC3339)
	}
	client := imds.NewFromConfig(cfg)
	md, err := client.GetMetadata(ctx, &imds.GetMetadataInput{Path: "iam/security-credentials/"})
	if err != nil {
		return nil, fmt.Errorf("listing the role: %w", err)
	}
	role, err := io.ReadAll(md.Content)
	md.Content.Close()
	if err != nil {
		return nil, fmt.Errorf("reading the role: %w", err)
	}
	out.Role = string(role)
	// iam/info is answered only when the agent knows the role's ARN; an
	// error here is reported, not fatal, so the caller can assert on it.
	info, err := client.GetIAMInfo(ctx, &imds.GetIAMInfoInput{})
	if err != nil {
		out.InfoError = err.Error()
	} else {
		out.InstanceProfileArn = info.InstanceProfileArn
	}
	if stsEndpoint != "" {
		client := sts.NewFromConfig(cfg, func(o *sts.Options) { o.BaseEndpoint = &stsEndpoint })
		id, err := client.GetCallerIdentity(ctx, &sts.GetCallerIdentityInput{})
		if err != nil {
			return nil, fmt.Errorf("STS GetCallerIdentity: %w", err)
		}
		if id.Arn != nil {
			out.Arn = *id.Arn
		}
	}
	return out, nil
}

func main() {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	stsEndpoint := ""
	if len(os.Args) > 1 {
		stsEndpoint = os.Args[1]
	}
	out, err := run(ctx, stsEndpoint)
	if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
}
