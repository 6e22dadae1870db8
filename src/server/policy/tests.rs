use super::*;
use crate::server::model::PodPhase;

/// `resolver`'s policy (`--session=kiam`, no tags) deciding one request.
fn check(
    pod: &PodInfo,
    requested: &str,
    namespace: Option<&NamespacePolicy>,
    resolver: &ArnResolver,
) -> Decision {
    policy_with(resolver, false).decide(pod, requested, namespace)
}

fn policy_with(resolver: &ArnResolver, tags: bool) -> Policy {
    Policy::new(
        resolver.clone(),
        "kiam",
        tags,
        NamespacePolicyConfig::default(),
    )
}

fn identity_for(
    pod: &PodInfo,
    resolver: &ArnResolver,
    session: &str,
) -> Result<Option<Identity>, PolicyError> {
    assert_eq!(session, "kiam");
    policy_with(resolver, false).identity(pod)
}

const BASE: &str = "arn:aws:iam::123456789012:role/";

fn resolver() -> ArnResolver {
    ArnResolver::new(BASE).unwrap()
}

fn pod(role: Option<&str>) -> PodInfo {
    PodInfo {
        namespace: "team-a".into(),
        name: "web-1".into(),
        uid: "uid-1".into(),
        ips: Some("10.0.0.5".parse().unwrap()),
        phase: PodPhase::Running,
        host_network: false,
        deletion: None,
        role: role.map(Into::into),
        session_name: None,
        external_id: None,
        service_account: Some("default".into()),
        node: None,
    }
}

fn ns(annotation: Option<&str>, strict: bool) -> NamespacePolicy {
    NamespacePolicy::compile(
        annotation,
        &NamespacePolicyConfig::new(strict, None).unwrap(),
    )
}

#[test]
fn resolves_names_paths_and_full_arns() {
    let r = resolver();
    assert_eq!(r.resolve("foo").unwrap(), format!("{BASE}foo"));
    assert_eq!(r.resolve("/foo").unwrap(), format!("{BASE}foo"));
    assert_eq!(r.resolve("team/foo").unwrap(), format!("{BASE}team/foo"));
    assert_eq!(r.resolve("/team/foo").unwrap(), format!("{BASE}team/foo"));
    let other_account = "arn:aws:iam::210987654321:role/path-prefix/another-role";
    assert_eq!(r.resolve(other_account).unwrap(), other_account);
    let china = "arn:aws-cn:iam::123456789012:role/foo";
    assert_eq!(r.resolve(china).unwrap(), china);
}

#[test]
fn base_without_trailing_slash_or_with_a_path() {
    let r = ArnResolver::new("arn:aws:iam::123456789012:role").unwrap();
    assert_eq!(r.base(), BASE);
    assert_eq!(r.resolve("foo").unwrap(), format!("{BASE}foo"));
    let r = ArnResolver::new("arn:aws:iam::123456789012:role/kiam/").unwrap();
    assert_eq!(r.resolve("/foo").unwrap(), format!("{BASE}kiam/foo"));
    let r = ArnResolver::new("arn:aws:iam::123456789012:role/kiam").unwrap();
    assert_eq!(r.resolve("foo").unwrap(), format!("{BASE}kiam/foo"));
}

#[test]
fn bad_bases_name_the_flag() {
    for bad in [
        "",
        "role/",
        "arn:aws:s3:::bucket/",
        "arn:aws:iam::123456789012:user/",
        "arn:aws:iam:eu-west-1:123456789012:role/",
        "arn:aws:iam:::role/",
    ] {
        let e = ArnResolver::new(bad).unwrap_err();
        assert!(e.to_string().contains("--role-base-arn"), "{bad:?}: {e}");
    }
}

#[test]
fn garbage_roles_are_refused_naming_the_annotation() {
    let r = resolver();
    assert_eq!(r.resolve("").unwrap_err(), PolicyError::EmptyRole);
    for bad in [
        "/",
        "foo/",
        " foo",
        "foo bar",
        "foo\n",
        "fo\u{7}o",
        "rôle",
        "a//b",
        "foo:bar",
        "arn:",
        "arn:aws:iam::123456789012:user/foo",
        "arn:aws:s3:::bucket",
        "arn:aws:iam::123456789012:role/",
        "arn:aws:iam::123456789012:role/a b",
        "arn:aws:iam:us-east-1:123456789012:role/foo",
        &"x".repeat(65),
    ] {
        let e = r.resolve(bad).unwrap_err();
        assert!(
            e.to_string().contains(ROLE_ANNOTATION),
            "{bad:?} gave {e} without naming the annotation"
        );
    }
    // The longest legal name is fine.
    assert!(r.resolve(&"x".repeat(64)).is_ok());
}

#[test]
fn base_from_instance_profile() {
    assert_eq!(
        base_arn_from_instance_profile("arn:aws:iam::123456789012:instance-profile/node").unwrap(),
        BASE
    );
    assert_eq!(
        base_arn_from_instance_profile("arn:aws:iam::123456789012:instance-profile/path/node")
            .unwrap(),
        BASE
    );
    assert_eq!(
        base_arn_from_instance_profile("arn:aws-us-gov:iam::123456789012:instance-profile/n")
            .unwrap(),
        "arn:aws-us-gov:iam::123456789012:role/"
    );
    let r =
        ArnResolver::from_instance_profile("arn:aws:iam::123456789012:instance-profile/n").unwrap();
    assert_eq!(r.resolve("foo").unwrap(), format!("{BASE}foo"));
    for bad in ["", "arn:aws:iam::123456789012:role/node", "not an arn"] {
        assert!(matches!(
            base_arn_from_instance_profile(bad),
            Err(PolicyError::InvalidInstanceProfile { .. })
        ));
    }
}

#[test]
fn session_names() {
    assert_eq!(session_name("kiam", None), "kiam-kiam");
    assert_eq!(session_name("kiam", Some("")), "kiam-kiam");
    assert_eq!(session_name("kiam", Some("batch-job")), "kiam-batch-job");
    assert_eq!(
        session_name("kiam", Some("a+b=c,d.e@f_g-h")),
        "kiam-a+b=c,d.e@f_g-h"
    );
    // One hyphen per character, including multi-byte ones.
    assert_eq!(session_name("kiam", Some("a b/c:é")), "kiam-a-b-c--");
    assert_eq!(session_name("my session", None), "kiam-my-session");
}

#[test]
fn session_names_are_cut_to_64_characters() {
    let long = session_name("kiam", Some(&"x".repeat(100)));
    assert_eq!(long.len(), MAX_SESSION_NAME);
    assert_eq!(long, format!("kiam-{}", "x".repeat(59)));
    // Sanitising happens first, so multi-byte input cannot split a character.
    let unicode = session_name("kiam", Some(&"é".repeat(100)));
    assert_eq!(unicode, format!("kiam-{}", "-".repeat(59)));
    let exact = session_name("kiam", Some(&"y".repeat(59)));
    assert_eq!(exact.len(), 64);
}

#[test]
fn identity_uses_resolved_arn_session_and_external_id() {
    let mut p = pod(Some("/foo"));
    p.session_name = Some("job 7".into());
    p.external_id = Some("ext".into());
    let id = identity_for(&p, &resolver(), "kiam").unwrap().unwrap();
    assert_eq!(&*id.role_arn, format!("{BASE}foo"));
    assert_eq!(&*id.session_name, "kiam-job-7");
    assert_eq!(id.external_id.as_deref(), Some("ext"));
    assert_eq!(identity_for(&pod(None), &resolver(), "kiam").unwrap(), None);
    assert!(identity_for(&pod(Some("bad role")), &resolver(), "kiam").is_err());
    // `foo` and its full ARN are one identity: they share credentials.
    let full = identity_for(&pod(Some(&format!("{BASE}foo"))), &resolver(), "kiam").unwrap();
    let bare = identity_for(&pod(Some("foo")), &resolver(), "kiam").unwrap();
    assert_eq!(full, bare);
}

fn forbidden(d: &Decision) -> (Check, &str) {
    match d {
        Decision::Forbidden { check, explanation } => (*check, explanation),
        Decision::Allowed(identity) => panic!("unexpectedly allowed {identity:?}"),
    }
}

#[test]
fn allowed_when_requested_is_annotated_and_namespace_permits() {
    let r = resolver();
    let p = pod(Some("foo"));
    let any = ns(Some(".*"), true);
    for requested in ["foo", "/foo", &format!("{BASE}foo")] {
        let d = check(&p, requested, Some(&any), &r);
        let Decision::Allowed(identity) = &d else {
            panic!("{requested}: {d:?}")
        };
        assert_eq!(&*identity.role_arn, format!("{BASE}foo"), "{requested}");
        // The identity the decision carries is the one the pod uses.
        assert_eq!(
            Some(identity.clone()),
            identity_for(&p, &r, "kiam").unwrap()
        );
        assert!(d.is_allowed());
        assert_eq!(d.explanation(), "");
    }
}

#[test]
fn requested_other_than_annotated_is_forbidden() {
    let r = resolver();
    let any = ns(Some(".*"), true);
    let d = check(&pod(Some("foo")), "bar", Some(&any), &r);
    let (which, why) = forbidden(&d);
    assert_eq!(which, Check::AnnotatedRole);
    assert!(
        why.contains("requested \"bar\"") && why.contains("annotated with \"foo\""),
        "{why}"
    );
    // Same name, other account: a different role.
    let d = check(
        &pod(Some("foo")),
        "arn:aws:iam::999999999999:role/foo",
        Some(&any),
        &r,
    );
    assert_eq!(forbidden(&d).0, Check::AnnotatedRole);
}

#[test]
fn missing_or_invalid_role_annotation_is_forbidden() {
    let r = resolver();
    let any = ns(Some(".*"), true);
    let d = check(&pod(None), "foo", Some(&any), &r);
    let (which, why) = forbidden(&d);
    assert_eq!(which, Check::AnnotatedRole);
    assert!(why.contains(ROLE_ANNOTATION), "{why}");
    let d = check(&pod(Some("foo bar")), "foo bar", Some(&any), &r);
    let (which, why) = forbidden(&d);
    assert_eq!(which, Check::AnnotatedRole);
    assert!(why.contains("whitespace"), "{why}");
    let d = check(&pod(Some("foo")), "", Some(&any), &r);
    assert!(forbidden(&d).1.contains("requested role \"\" is invalid"));
}

#[test]
fn strict_regex_is_anchored_around_alternatives() {
    let r = resolver();
    let p = pod(Some("foo-admin"));
    // Unanchored, `foo` is found inside the ARN.
    assert!(check(&p, "foo-admin", Some(&ns(Some("foo"), false)), &r).is_allowed());
    // Strict, it must match the whole ARN.
    let d = check(&p, "foo-admin", Some(&ns(Some("foo"), true)), &r);
    let (which, why) = forbidden(&d);
    assert_eq!(which, Check::NamespacePermitted);
    assert!(
        why.contains("anchored") && why.contains(PERMITTED_ANNOTATION),
        "{why}"
    );
    // kiam's `^a|b$` would let `b` match anywhere at the end; ours anchors both.
    let alt = ns(Some("arn:aws:iam::123456789012:role/foo|admin"), true);
    assert!(!check(&p, "foo-admin", Some(&alt), &r).is_allowed());
    let alt = ns(Some(&format!("{BASE}foo|{BASE}foo-admin")), true);
    assert!(check(&p, "foo-admin", Some(&alt), &r).is_allowed());
}

#[test]
fn namespace_without_annotation_permits_nothing_unless_a_default_is_set() {
    let r = resolver();
    let p = pod(Some("foo"));
    for missing in [ns(None, true), ns(Some(""), true)] {
        let d = check(&p, "foo", Some(&missing), &r);
        let (which, why) = forbidden(&d);
        assert_eq!(which, Check::NamespacePermitted);
        assert!(why.contains("no iam.amazonaws.com/permitted"), "{why}");
    }
    let cfg = NamespacePolicyConfig::new(true, Some(".*/foo")).unwrap();
    let default = NamespacePolicy::compile(None, &cfg);
    assert!(check(&p, "foo", Some(&default), &r).is_allowed());
    let d = check(&pod(Some("bar")), "bar", Some(&default), &r);
    assert!(forbidden(&d).1.contains("--default-permitted-regexp"));
    // An annotation replaces the default, it does not add to it.
    let own = NamespacePolicy::compile(Some(".*/bar"), &cfg);
    assert!(!check(&p, "foo", Some(&own), &r).is_allowed());
    // Unknown namespace: nothing.
    let d = check(&p, "foo", None, &r);
    assert_eq!(forbidden(&d).0, Check::NamespacePermitted);
}

#[test]
fn invalid_or_huge_regex_denies_with_an_explanation() {
    let r = resolver();
    let p = pod(Some("foo"));
    let cfg = NamespacePolicyConfig::new(true, Some(".*")).unwrap();
    let bad = NamespacePolicy::compile(Some("(unclosed"), &cfg);
    assert!(matches!(bad, NamespacePolicy::Invalid { .. }));
    let d = check(&p, "foo", Some(&bad), &r);
    let (which, why) = forbidden(&d);
    assert_eq!(which, Check::NamespacePermitted);
    assert!(
        why.contains("invalid") && why.contains("(unclosed"),
        "{why}"
    );
    assert!(!why.contains('\n'), "{why}");
    let huge = NamespacePolicy::compile(Some("(?:a{1000}){1000}"), &cfg);
    let d = check(&p, "foo", Some(&huge), &r);
    assert!(
        forbidden(&d).1.contains("allowed size"),
        "{}",
        d.explanation()
    );
    let deep = format!("{}a{}", "(".repeat(500), ")".repeat(500));
    assert!(!check(
        &p,
        "foo",
        Some(&NamespacePolicy::compile(Some(&deep), &cfg)),
        &r
    )
    .is_allowed());
}

#[test]
fn invalid_default_regex_names_the_flag() {
    let e = NamespacePolicyConfig::new(true, Some("(")).unwrap_err();
    assert!(e.to_string().contains("--default-permitted-regexp"), "{e}");
    assert!(NamespacePolicyConfig::new(true, Some("  "))
        .unwrap()
        .default
        .is_none());
}

#[test]
fn session_tags_are_part_of_the_identity() {
    let r = resolver();
    let any = ns(Some(".*"), true);
    let mut a = pod(Some("foo"));
    let mut b = pod(Some("foo"));
    b.namespace = "team-b".into();
    b.name = "web-2".into();
    // Without --session-tags the two pods share one identity (one credential).
    let untagged = policy_with(&r, false);
    assert_eq!(
        untagged.identity(&a).unwrap(),
        untagged.identity(&b).unwrap()
    );
    // With it, each pod's identity carries its own tags, so they never share.
    let tagged = policy_with(&r, true);
    let (Decision::Allowed(ia), Decision::Allowed(ib)) = (
        tagged.decide(&a, "foo", Some(&any)),
        tagged.decide(&b, "foo", Some(&any)),
    ) else {
        panic!("both allowed")
    };
    assert_ne!(ia, ib);
    assert_eq!(ia.tags.as_ref().unwrap().namespace, "team-a");
    assert_eq!(ib.tags.as_ref().unwrap().namespace, "team-b");
    assert_eq!(Some(ia.clone()), tagged.identity(&a).unwrap());
    a.service_account = None;
    let pairs: Vec<_> = SessionTags::for_pod(&a).pairs().map(|(k, _)| k).collect();
    assert_eq!(pairs, ["kiam-namespace", "kiam-pod"]);
}
