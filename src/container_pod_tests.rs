//! EKS Pod Identity ([`AgentKind::PodIdentity`]): answers without `RoleArn`, the role found
//! with GetCallerIdentity signed by the pod's own credentials.

use super::tests::{calls, harness_for, raw};
use super::*;

const POD_ROLE: &str = "arn:aws:iam::111122223333:role/pod-role";

fn pods(roles: &[&str]) -> super::tests::Harness {
    let roles = roles.iter().map(|r| RoleArn::parse(r).unwrap()).collect();
    harness_for(AgentKind::PodIdentity, roles, 16, 50.0)
}

#[tokio::test]
async fn the_role_comes_from_the_pods_own_session_once_per_raw_set() {
    let h = pods(&[]);
    let pod = raw("ASIARAWPOD1", None);
    let (first, cached) = h.locks.locked_for(&pod, None).await.unwrap();
    assert!(!cached);
    let (again, cached) = h.locks.locked_for(&pod, None).await.unwrap();
    assert!(cached);
    assert_eq!(first.access_key_id, again.access_key_id);
    // One GetCallerIdentity, signed with the pod's own key; one AssumeRole of its role.
    assert_eq!(*h.sts.caller_calls.lock().unwrap(), ["ASIARAWPOD1"]);
    let calls = calls(&h);
    assert_eq!(calls.len(), 1);
    let (source, request) = &calls[0];
    assert_eq!(source, "ASIARAWPOD1");
    assert_eq!(request.role_arn, POD_ROLE);
    assert_eq!(request.session_name, "credlock-eks-eks-demo-ASIARAWPOD1");
    assert!(
        request.policy.contains("role/pod-role"),
        "re-assuming denied"
    );
    assert!(
        request.policy.contains("role/instance"),
        "the instance role denied"
    );
}

#[tokio::test]
async fn a_listed_role_keeps_its_path_and_an_unlisted_name_gets_none() {
    let h = pods(&[
        "arn:aws:iam::111122223333:role/teams/payments/pod-role",
        "arn:aws:iam::444455556666:role/other/pod-b",
    ]);
    h.locks
        .locked_for(&raw("ASIARAWPOD1", None), None)
        .await
        .unwrap();
    h.sts.callers.lock().unwrap().insert(
        "ASIARAWPOD2".into(),
        "arn:aws:sts::111122223333:assumed-role/pod-b/eks-demo-x".into(),
    );
    h.locks
        .locked_for(&raw("ASIARAWPOD2", None), None)
        .await
        .unwrap();
    let roles: Vec<String> = calls(&h).into_iter().map(|(_, r)| r.role_arn).collect();
    // pod-b is listed for another account only: no path for this one.
    assert_eq!(
        roles,
        [
            "arn:aws:iam::111122223333:role/teams/payments/pod-role",
            "arn:aws:iam::111122223333:role/pod-b",
        ]
    );
}

#[tokio::test]
async fn pods_never_share_a_set_and_a_rotated_set_is_looked_up_again() {
    let h = pods(&[]);
    let (a, _) = h
        .locks
        .locked_for(&raw("ASIARAWPODA", None), None)
        .await
        .unwrap();
    let (b, _) = h
        .locks
        .locked_for(&raw("ASIARAWPODB", None), None)
        .await
        .unwrap();
    assert_ne!(a.access_key_id, b.access_key_id);
    let sources: Vec<String> = calls(&h).into_iter().map(|(s, _)| s).collect();
    assert_eq!(sources, ["ASIARAWPODA", "ASIARAWPODB"]);
    assert_eq!(
        *h.sts.caller_calls.lock().unwrap(),
        ["ASIARAWPODA", "ASIARAWPODB"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_pod_whose_credentials_are_no_role_session_fails_closed_and_backs_off() {
    let h = pods(&[]);
    h.sts.callers.lock().unwrap().insert(
        "ASIARAWUSER".into(),
        "arn:aws:iam::111122223333:user/someone".into(),
    );
    let pod = raw("ASIARAWUSER", None);
    let err = h.locks.locked_for(&pod, None).await.unwrap_err();
    assert!(matches!(err, Failure::NotRoleSession(_)), "{err}");
    assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
    // Within the back-off: no STS call at all.
    let err = h.locks.locked_for(&pod, None).await.unwrap_err();
    assert!(matches!(err, Failure::Backoff(_)), "{err}");
    assert_eq!(h.sts.caller_calls.lock().unwrap().len(), 1);
    assert!(calls(&h).is_empty());
}

#[tokio::test]
async fn an_sts_error_on_the_lookup_fails_closed_without_an_assume() {
    let h = pods(&[]);
    *h.sts.failing.lock().unwrap() = Some(StsErrorCode::Throttling);
    let err = h
        .locks
        .locked_for(&raw("ASIARAWPOD1", None), None)
        .await
        .unwrap_err();
    assert!(matches!(err, Failure::Sts(_)), "{err}");
    assert!(calls(&h).is_empty());
}

#[test]
fn pod_roles_from_session_arns() {
    let listed = [RoleArn::parse("arn:aws:iam::111122223333:role/p/r").unwrap()];
    let (role, session) = pod_role(
        "arn:aws:sts::111122223333:assumed-role/r/eks-c-pod-1",
        &listed,
    )
    .unwrap();
    assert_eq!(role.to_string(), "arn:aws:iam::111122223333:role/p/r");
    assert_eq!(session, "eks-c-pod-1");
    let (role, _) = pod_role("arn:aws-cn:sts::111122223333:assumed-role/r/s", &listed).unwrap();
    assert_eq!(role.to_string(), "arn:aws-cn:iam::111122223333:role/r");
    for not_a_session in [
        "arn:aws:iam::111122223333:user/u",
        "arn:aws:sts::111122223333:federated-user/u",
        "arn:aws:sts::111122223333:assumed-role/r",
        "",
    ] {
        assert!(
            pod_role(not_a_session, &listed).is_none(),
            "{not_a_session}"
        );
    }
}

#[test]
fn pod_session_names_fit_sts() {
    let long = "eks-a-very-long-cluster-name-and-a-long-pod-name-0123456789abcdef";
    let name = session_name(AgentKind::PodIdentity, Some(long), "ASIARAWPOD");
    assert!(
        name.starts_with("credlock-eks-") && name.len() <= 64,
        "{name}"
    );
    assert!(!name.contains("ASIARAW"));
    assert_eq!(
        session_name(AgentKind::PodIdentity, Some("eks-c-p-1"), "ASIARAWPOD"),
        "credlock-eks-eks-c-p-1"
    );
}

#[test]
fn the_agents_documented_answer_is_a_document_without_a_role() {
    // The Pod Identity Agent's answer (EksCredentialsResponse: AccessKeyId, SecretAccessKey,
    // Token, AccountId, Expiration), as "How EKS Pod Identity works" shows it.
    let body = br#"{"AccessKeyId":"ASIARAWPOD1EXAMPLE01","SecretAccessKey":"wJalrXUtnFEMI/K7MDENG/bPxRfiCYRAWSECRET","Token":"IQoJb3JpZ2luX2VjRAWTOKEN","AccountId":"111122223333","Expiration":"2026-12-02T12:00:00Z"}"#;
    let headers = http::HeaderMap::new();
    match judge(200, &headers, body, &[]) {
        Verdict::Document(raw) => {
            assert!(raw.role_arn.is_none());
            assert_eq!(raw.access_key_id, "ASIARAWPOD1EXAMPLE01");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_role_named_in_a_pod_identity_answer_is_not_believed() {
    let h = pods(&[]);
    let claimed = raw("ASIARAWPOD1", Some("arn:aws:iam::111122223333:role/admin"));
    h.locks
        .locked_for(&claimed, Some("chosen-by-the-pod"))
        .await
        .unwrap();
    let calls = calls(&h);
    assert_eq!(
        calls[0].1.role_arn, POD_ROLE,
        "the pod's own session's role"
    );
    assert_eq!(
        calls[0].1.session_name, "credlock-eks-eks-demo-ASIARAWPOD1",
        "the session from STS, not from the request"
    );
}
