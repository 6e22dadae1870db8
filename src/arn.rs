//! IAM ARNs: the one parser the server (role resolution, base ARNs,
//! instance profiles) and the agent (`AccountId`, `iam/info`) share.
//!
//! The surprise: account ids are checked by character set only, not for
//! AWS's twelve digits, because emulators and examples use shorter ones;
//! what makes an ARN a *role* is checked in full (IAM's name and path rules).

/// IAM's limits on a role name and its path.
const MAX_ROLE_NAME: usize = 64;
const MAX_ROLE_PATH: usize = 512;

/// The parts of an IAM ARN: `arn:<partition>:iam::<account>:<resource>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IamArn<'a> {
    pub partition: &'a str,
    pub account: &'a str,
    pub resource: &'a str,
}

impl<'a> IamArn<'a> {
    /// Splits and checks an IAM ARN; the error says which part is wrong.
    pub fn parse(arn: &'a str) -> Result<Self, &'static str> {
        let mut parts = arn.splitn(6, ':');
        let (
            Some("arn"),
            Some(partition),
            Some(service),
            Some(region),
            Some(account),
            Some(resource),
        ) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        )
        else {
            return Err("it does not have six ':'-separated parts");
        };
        if partition.is_empty()
            || !partition
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err("the partition (aws, aws-cn, aws-us-gov, ...) is missing or malformed");
        }
        if service != "iam" {
            return Err("the service is not iam");
        }
        if !region.is_empty() {
            return Err("IAM ARNs have an empty region");
        }
        if account.is_empty()
            || !account
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err("the account id is missing or malformed");
        }
        Ok(IamArn {
            partition,
            account,
            resource,
        })
    }
}

/// A role ARN, `arn:<partition>:iam::<account>:role/<path/name>`, checked
/// against IAM's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoleArn<'a> {
    pub partition: &'a str,
    pub account: &'a str,
    /// Everything after `role/`: an optional path and the name.
    pub path_and_name: &'a str,
}

impl<'a> RoleArn<'a> {
    pub fn parse(arn: &'a str) -> Result<Self, &'static str> {
        let iam = IamArn::parse(arn)?;
        let path_and_name = iam
            .resource
            .strip_prefix("role/")
            .ok_or("the resource is not role/<name>")?;
        check_role_path(path_and_name)?;
        Ok(RoleArn {
            partition: iam.partition,
            account: iam.account,
            path_and_name,
        })
    }
}

/// Checks `path/name` (the part after `role/`) against IAM's rules: the
/// name is `[\w+=,.@-]{1,64}`, the path printable ASCII without spaces.
pub fn check_role_path(path_and_name: &str) -> Result<(), &'static str> {
    if path_and_name.is_empty() {
        return Err("the role name is empty");
    }
    if path_and_name
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err("it contains whitespace or control characters");
    }
    if !path_and_name.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err("it contains characters outside printable ASCII");
    }
    let (path, name) = match path_and_name.rsplit_once('/') {
        Some((path, name)) => (path, name),
        None => ("", path_and_name),
    };
    if name.is_empty() {
        return Err("it ends with '/', so the role name is empty");
    }
    if name.len() > MAX_ROLE_NAME {
        return Err("the role name is longer than IAM's 64 characters");
    }
    if !name.bytes().all(is_iam_name_byte) {
        return Err("the role name may only contain letters, digits and _+=,.@-");
    }
    if path.len() > MAX_ROLE_PATH {
        return Err("the role path is longer than IAM's 512 characters");
    }
    if path.split('/').skip(1).any(str::is_empty) {
        return Err("the role path contains '//'");
    }
    Ok(())
}

/// `[\w+=,.@-]` with `\w` meaning ASCII word characters, as in IAM and STS.
pub fn is_iam_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'=' | b',' | b'.' | b'@' | b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_arns_in_any_partition_and_account() {
        let a = RoleArn::parse("arn:aws:iam::123456789012:role/team/app").unwrap();
        assert_eq!(
            (a.partition, a.account, a.path_and_name),
            ("aws", "123456789012", "team/app")
        );
        assert!(RoleArn::parse("arn:aws-cn:iam::123:role/x").is_ok());
        for bad in [
            "arn:aws:iam::123456789012:user/x",
            "arn:aws:s3:::bucket",
            "arn:aws:iam:eu-west-1:123456789012:role/x",
            "arn:aws:iam:::role/x",
            "arn:aws:iam::123456789012:role/",
            "arn:aws:iam::123456789012:role/a b",
            "role/x",
        ] {
            assert!(RoleArn::parse(bad).is_err(), "{bad}");
        }
    }
}
