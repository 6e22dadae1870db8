//! Unit tests of the pool's classification of server answers.

use super::*;

#[test]
fn statuses_are_classified_by_message() {
    // Go kiam sends these with code Unknown.
    assert_eq!(
        classify(&Status::unknown("no pod found")),
        ClientError::NotFound
    );
    assert_eq!(
        classify(&Status::unknown("forbidden by policy")),
        ClientError::Forbidden(None)
    );
    assert_eq!(
        classify(&Status::not_found("no pod found")),
        ClientError::NotFound
    );
    // A Go kiam server's GetPodRole for an unknown IP.
    assert_eq!(
        classify(&Status::unknown("pod not found")),
        ClientError::NotFound
    );
    assert_eq!(
        classify(&Status::permission_denied("forbidden by policy")),
        ClientError::Forbidden(None)
    );
    assert!(matches!(
        classify(&Status::unavailable("down")),
        ClientError::Unavailable(_)
    ));
    assert!(matches!(
        classify(&Status::internal("sts failed")),
        ClientError::Server(_)
    ));
    let local = Status::from_error(Box::new(std::io::Error::other("connection reset")));
    assert!(matches!(classify(&local), ClientError::Unavailable(_)));
}

/// Issue 12: only a server that could not be reached (or says it is
/// not ready) is "no server answered"; a server that ran out of time
/// or refused for good has answered, and a refusal is final.
#[test]
fn only_unreachable_or_unready_servers_are_unavailable() {
    for status in [
        Status::deadline_exceeded("lookup took too long"),
        Status::cancelled("cancelled"),
    ] {
        let e = classify(&status);
        assert!(matches!(e, ClientError::Timeout(_)), "{e:?}");
        assert!(e.answered() && !e.is_final());
    }
    for status in [
        Status::failed_precondition("error retrieving credentials: AccessDenied"),
        Status::failed_precondition("several live pods share this IP; refusing to guess"),
        Status::permission_denied("some other refusal"),
    ] {
        let e = classify(&status);
        assert!(matches!(e, ClientError::Final(_)), "{e:?}");
        assert!(e.answered() && e.is_final());
    }
    let e = classify(&Status::internal(
        "error retrieving credentials: Throttling",
    ));
    assert!(e.answered() && !e.is_final(), "{e:?}");
    let e = classify(&Status::unavailable("kiam server is starting"));
    assert!(!e.answered(), "{e:?}");
    // tonic's own status for a failed connection carries its cause.
    let refused = Status::from_error(Box::new(std::io::Error::new(
        std::io::ErrorKind::ConnectionRefused,
        "connection refused",
    )));
    assert!(!classify(&refused).answered());
}

#[test]
fn a_denial_names_the_check_that_refused() {
    for check in [Check::AnnotatedRole, Check::NamespacePermitted] {
        let mut status = Status::permission_denied(FORBIDDEN_BY_POLICY);
        status
            .metadata_mut()
            .insert(DENIED_CHECK_KEY, check.as_str().parse().unwrap());
        assert_eq!(classify(&status), ClientError::Forbidden(Some(check)));
    }
    // A check this agent does not know yet reads as no check at all.
    let mut status = Status::permission_denied(FORBIDDEN_BY_POLICY);
    status
        .metadata_mut()
        .insert(DENIED_CHECK_KEY, "something-new".parse().unwrap());
    assert_eq!(classify(&status), ClientError::Forbidden(None));
    // The logs say which check refused.
    assert_eq!(
        ClientError::Forbidden(Some(Check::AnnotatedRole)).to_string(),
        "forbidden by policy (annotated-role)"
    );
    assert_eq!(
        ClientError::Forbidden(None).to_string(),
        "forbidden by policy"
    );
}
