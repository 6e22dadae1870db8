//! Unit tests of the rule's arguments, validation and placement parsing.

use super::*;

fn rule(iface: &str) -> Result<IptablesRule, IptablesError> {
    IptablesRule::new("10.0.0.7".parse().unwrap(), 3100, iface)
}

fn spec(iface: &str) -> String {
    rule(iface).unwrap().spec().join(" ")
}

#[test]
fn plain_interface() {
    assert_eq!(
        spec("docker0"),
        "-p tcp -d 169.254.169.254 --dport 80 -i docker0 -m comment --comment kiam-agent -j DNAT --to-destination 10.0.0.7:3100"
    );
}

#[test]
fn negated_interface_becomes_bang_before_dash_i() {
    assert_eq!(
        spec("!eth0"),
        "-p tcp -d 169.254.169.254 --dport 80 ! -i eth0 -m comment --comment kiam-agent -j DNAT --to-destination 10.0.0.7:3100"
    );
}

#[test]
fn wildcards_pass_through() {
    assert!(spec("cali+").contains(" -i cali+ -m comment"));
    assert!(spec("!cali+").contains(" ! -i cali+ -m comment"));
    assert!(spec("+").contains(" -i + -m comment"));
}

#[test]
fn target_is_host_and_port() {
    let r = IptablesRule::new("192.168.1.2".parse().unwrap(), 8181, "eni+").unwrap();
    assert_eq!(r.target(), "192.168.1.2:8181".parse().unwrap());
    assert!(r
        .to_string()
        .starts_with("iptables -t nat PREROUTING -p tcp"));
    assert!(r.to_string().ends_with("--to-destination 192.168.1.2:8181"));
}

#[test]
fn command_lines_wait_for_the_xtables_lock() {
    let r = rule("docker0").unwrap();
    let check = r.args(&["-C", "PREROUTING"]);
    assert_eq!(&check[..6], ["-w", "5", "-t", "nat", "-C", "PREROUTING"]);
    assert_eq!(&check[6..], r.spec());
    let insert = r.args(&["-I", "PREROUTING", "1"]);
    assert_eq!(&insert[4..7], ["-I", "PREROUTING", "1"]);
}

/// `iptables -S PREROUTING` as nft and legacy iptables print it.
const LISTING: &str = "-P PREROUTING ACCEPT\n\
    -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
    -A PREROUTING -d 169.254.169.254/32 -i cali+ -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.0.7:8181\n\
    -A PREROUTING -d 169.254.169.254/32 ! -i eth0 -p tcp -m tcp --dport 80 -m comment --comment kiam-agent -j DNAT --to-destination 10.0.0.7:3100\n\
    -A PREROUTING -d 169.254.169.254/32 ! -i eth0 -p tcp -m tcp --dport 80 -m comment --comment kiam-agent -j DNAT --to-destination 10.0.0.7:3100\n";

#[test]
fn position_finds_kiams_copies_below_other_rules() {
    let below = rule("!eth0").unwrap().position_in(LISTING);
    assert_eq!(
        below,
        Position {
            first: false,
            copies: 2
        }
    );
    // The kube2iam-style rule differs only in its port and interface.
    let other = IptablesRule::new("10.0.0.7".parse().unwrap(), 8181, "eth0").unwrap();
    assert_eq!(other.position_in(LISTING).copies, 0);
    let negation_matters = rule("eth0").unwrap().position_in(LISTING);
    assert_eq!(negation_matters.copies, 0);
}

/// A kube2iam (or Go kiam) DNAT with the same match and target but without
/// kiam's comment is not kiam's rule: not counted, so kiam inserts its own
/// above it, and deleting the other one by hand never deletes kiam's.
#[test]
fn an_identical_rule_without_kiams_comment_is_not_kiams() {
    let listing = "-P PREROUTING ACCEPT\n\
        -A PREROUTING -d 169.254.169.254/32 -i cali+ -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.0.7:3100\n";
    assert_eq!(
        rule("cali+").unwrap().position_in(listing),
        Position {
            first: false,
            copies: 0
        }
    );
    let with_other_comment = "-P PREROUTING ACCEPT\n\
        -A PREROUTING -d 169.254.169.254/32 -i cali+ -p tcp -m tcp --dport 80 -m comment --comment kube2iam -j DNAT --to-destination 10.0.0.7:3100\n";
    assert_eq!(
        rule("cali+")
            .unwrap()
            .position_in(with_other_comment)
            .copies,
        0
    );
}

#[test]
fn position_sees_the_rule_first_as_iptables_prints_it() {
    let listing = "-P PREROUTING ACCEPT\n\
        -A PREROUTING -d 169.254.169.254/32 -i cali+ -p tcp -m tcp --dport 80 -m comment --comment kiam-agent -j DNAT --to-destination 10.0.0.7:3100\n\
        -A PREROUTING -j KUBE-SERVICES\n";
    assert_eq!(
        rule("cali+").unwrap().position_in(listing),
        Position {
            first: true,
            copies: 1
        }
    );
    assert_eq!(
        rule("cali+").unwrap().position_in("-P PREROUTING ACCEPT\n"),
        Position {
            first: false,
            copies: 0
        }
    );
}

#[test]
fn ipv6_host_is_rejected_naming_host() {
    let err = IptablesRule::new("fd00::1".parse().unwrap(), 3100, "docker0").unwrap_err();
    assert!(matches!(err, IptablesError::Ipv6Host(_)));
    let msg = err.to_string();
    assert!(msg.contains("--host fd00::1"), "{msg}");
    assert!(msg.contains("IPv4"), "{msg}");
}

#[test]
fn port_zero_is_rejected_naming_port() {
    let err = IptablesRule::new("10.0.0.7".parse().unwrap(), 0, "docker0").unwrap_err();
    assert!(err.to_string().contains("--port"), "{err}");
}

#[test]
fn bad_interface_names_are_rejected_naming_the_flag() {
    for bad in [
        "",
        "!",
        "! eth0",
        "eth0 -j ACCEPT",
        "eth0;reboot",
        "$(id)",
        "eth/0",
        "eth:0",
        "!!eth0",
        "ca+li",
        "eth0\n",
        "averyveryverylongname",
        "..",
    ] {
        let err = rule(bad).expect_err(bad);
        assert!(
            matches!(err, IptablesError::InvalidInterface { .. }),
            "{bad:?}: {err}"
        );
        assert!(
            err.to_string().starts_with("--host-interface "),
            "{bad:?}: {err}"
        );
    }
}

#[test]
fn longest_valid_names_are_accepted() {
    assert!(rule("abcdefghijklmno").is_ok());
    assert!(rule("!abcdefghijklmn+").is_ok());
    assert!(rule("veth.100@x_y-z").is_ok());
}

#[test]
fn failure_message_names_the_flag_and_includes_stderr() {
    use std::os::unix::process::ExitStatusExt;
    let out = Output {
        status: ExitStatus::from_raw(4 << 8),
        stdout: Vec::new(),
        stderr: b"Another app is currently holding the xtables lock.\n".to_vec(),
    };
    let msg = failed("iptables", &["-w".into(), "5".into()], &out).to_string();
    assert!(
        msg.starts_with("--iptables: `iptables -w 5` failed"),
        "{msg}"
    );
    assert!(msg.ends_with("holding the xtables lock."), "{msg}");
}

fn rule_v6(iface: &str) -> IptablesRule {
    IptablesRule::new_v6("2001:2::7".parse().unwrap(), 3100, iface).unwrap()
}

#[test]
fn the_ipv6_rule_sends_the_ipv6_metadata_address_to_the_agent() {
    let r = rule_v6("cali+");
    assert_eq!(r.family(), Family::V6);
    assert_eq!(
        r.spec().join(" "),
        "-p tcp -d fd00:ec2::254 --dport 80 -i cali+ -m comment --comment kiam-agent -j DNAT --to-destination [2001:2::7]:3100"
    );
    assert_eq!(r.target(), "[2001:2::7]:3100".parse().unwrap());
    assert!(r.to_string().starts_with("ip6tables -t nat PREROUTING "));
    // The same checks as the IPv4 rule.
    let err = IptablesRule::new_v6("10.0.0.7".parse().unwrap(), 3100, "eth0").unwrap_err();
    assert!(err.to_string().contains("--host-ipv6"), "{err}");
    assert!(IptablesRule::new_v6("2001:2::7".parse().unwrap(), 0, "eth0").is_err());
    assert!(IptablesRule::new_v6("2001:2::7".parse().unwrap(), 3100, "! eth0").is_err());
}

#[test]
fn the_ipv6_rule_is_found_as_ip6tables_prints_it() {
    // `ip6tables -S PREROUTING`: /128, `-m tcp`, its own option order.
    let listing = "-P PREROUTING ACCEPT\n\
        -A PREROUTING -j KUBE-SERVICES\n\
        -A PREROUTING -d fd00:ec2::254/128 ! -i eth0 -p tcp -m tcp --dport 80 -m comment --comment kiam-agent -j DNAT --to-destination [2001:2::7]:3100\n";
    assert_eq!(
        rule_v6("!eth0").position_in(listing),
        Position {
            first: false,
            copies: 1
        }
    );
    // The IPv4 rule is not the IPv6 one, and /32 is no IPv6 host suffix.
    assert_eq!(rule("!eth0").unwrap().position_in(listing).copies, 0);
    let v4_suffix = listing.replace("/128", "/32");
    assert_eq!(rule_v6("!eth0").position_in(&v4_suffix).copies, 0);
}

#[test]
fn container_credentials_rules() {
    let host: IpAddr = "10.0.0.7".parse().unwrap();
    let r = IptablesRule::container_credentials(host, 8181, "eni+").unwrap();
    assert_eq!(
        r.spec().join(" "),
        "-p tcp -d 169.254.170.23 --dport 80 -i eni+ -m comment --comment kiam-agent -j DNAT --to-destination 10.0.0.7:8181"
    );
    assert_eq!(r.destination(), IpAddr::from(CONTAINER_CREDENTIALS_ADDRESS));
    let local = IptablesRule::container_credentials_local(host, 8181).unwrap();
    assert_eq!(
        local.to_string(),
        "iptables -t nat OUTPUT -p tcp -d 169.254.170.23 --dport 80 -m comment --comment kiam-agent -j DNAT --to-destination 10.0.0.7:8181"
    );
    // Its placement is read from its own chain.
    let listing = "-P OUTPUT ACCEPT\n\
        -A OUTPUT -d 169.254.170.23/32 -p tcp -m tcp --dport 80 -m comment --comment kiam-agent -j DNAT --to-destination 10.0.0.7:8181\n";
    assert_eq!(
        local.position_in(listing),
        Position {
            first: true,
            copies: 1
        }
    );
    let v6: IpAddr = "2001:2::7".parse().unwrap();
    let r6 = IptablesRule::container_credentials_v6(v6, 8181, "eni+").unwrap();
    assert_eq!(r6.family(), Family::V6);
    assert!(r6.spec().join(" ").contains("-d fd00:ec2::23 "));
    let l6 = IptablesRule::container_credentials_local(v6, 8181).unwrap();
    assert_eq!(l6.family(), Family::V6);
    assert!(IptablesRule::container_credentials(v6, 8181, "eni+").is_err());
    assert!(IptablesRule::container_credentials_local(host, 0).is_err());
}

#[test]
fn kiams_rules_share_the_top_without_trading_places() {
    let host: IpAddr = "10.0.0.7".parse().unwrap();
    let metadata = IptablesRule::new(host, 8181, "eni+").unwrap();
    let container = IptablesRule::container_credentials(host, 8181, "eni+").unwrap();
    let listing = "-P PREROUTING ACCEPT\n\
        -A PREROUTING -d 169.254.170.23/32 -i eni+ -p tcp -m tcp --dport 80 -m comment --comment kiam-agent -j DNAT --to-destination 10.0.0.7:8181\n\
        -A PREROUTING -d 169.254.169.254/32 -i eni+ -p tcp -m tcp --dport 80 -m comment --comment kiam-agent -j DNAT --to-destination 10.0.0.7:8181\n\
        -A PREROUTING -j KUBE-SERVICES\n";
    assert!(metadata.position_in(listing).first);
    assert!(container.position_in(listing).first);
    // Another program's DNAT of the metadata address (to anywhere else) is
    // above kiam's rule: not first.
    let displaced = "-A PREROUTING -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.0.9:8181\n\
        -A PREROUTING -d 169.254.169.254/32 -i eni+ -p tcp -m tcp --dport 80 -m comment --comment kiam-agent -j DNAT --to-destination 10.0.0.7:8181\n";
    assert!(!metadata.position_in(displaced).first);
}
