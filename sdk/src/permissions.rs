//! What a NATS identity of a Conveyor part may publish and subscribe to, as subject
//! allow-lists (docs/security.md, "Scoped identities"). One definition shared by the operator,
//! which signs them into per-Worker user JWTs ([`crate::jwt`]), and the tests that give them to
//! a real server. Pure functions of the queue's names.

use crate::names::QueueRef;

/// Subjects an identity may publish to and subscribe to; anything else is refused by the
/// server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    /// Subjects (wildcards allowed) the identity may publish to.
    pub publish_allow: Vec<String>,
    /// Subjects (wildcards allowed) the identity may subscribe to.
    pub subscribe_allow: Vec<String>,
}

/// The prefix of every inbox a Worker's pods create (`_INBOX_<uid>`), from the Worker's uid:
/// the client is given it as its inbox prefix and may subscribe under it only, so no Worker
/// reads another's replies. The uid's characters are all valid in a subject token.
pub fn worker_inbox_prefix(worker_uid: &str) -> String {
    format!("_INBOX_{worker_uid}")
}

/// What a worker of `queue` needs, with `levels` priority levels (one consumer each; a token
/// like `workers-p*` is not a NATS wildcard, so each level is its own subject), the queue's
/// rate-limit tokens when `rate_limited`, and replies under `inbox_prefix`:
///
/// - publish: stream info of the queue and its cancellations; consumer info and pulls of each
///   level's consumer; acks (`$JS.ACK.<stream>.>`: ack, nak, in-progress, term); the
///   ephemeral ordered consumer that follows cancellations (create, delete, flow control);
///   message get and delete on the work stream and the dead-letter subject (the sweep after a
///   lost connection, `stored::sweep_unreadable`, reads an unreadable job by sequence,
///   dead-letters it and deletes it; ordinary dead-lettering only publishes there); message
///   get and delete on the cancel stream (`sweep_unreadable_cancels` deletes cancellations no
///   client can read); the results subjects; `_INBOX.>` (results and progress to waiting
///   producers); when rate-limited, the tokens stream's info, its consumer's info and pulls,
///   and acks of its tokens.
/// - subscribe: `<inbox_prefix>.>` and, for multi-level queues, the job and delayed subjects
///   (the wake-up of an idle worker).
///
/// Not in it, so refused: purging, deleting or updating any stream, creating consumers on
/// the work stream, and every subject of another queue.
pub fn worker(queue: &QueueRef, levels: u8, rate_limited: bool, inbox_prefix: &str) -> Permissions {
    let stream = queue.stream();
    let cancels = queue.cancel_stream();
    let mut publish = vec![
        format!("$JS.API.STREAM.INFO.{stream}"),
        format!("$JS.API.STREAM.INFO.{cancels}"),
    ];
    for level in 0..levels.max(1) {
        let consumer = queue.consumer(level);
        publish.push(format!("$JS.API.CONSUMER.INFO.{stream}.{consumer}"));
        publish.push(format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"));
    }
    publish.extend([
        format!("$JS.ACK.{stream}.>"),
        // The ordered consumer that follows cancellations is ephemeral: CREATE.<stream>.
        format!("$JS.API.CONSUMER.CREATE.{cancels}"),
        format!("$JS.API.CONSUMER.CREATE.{cancels}.>"),
        format!("$JS.API.CONSUMER.DELETE.{cancels}.>"),
        format!("$JS.FC.{cancels}.>"),
        format!("$JS.API.STREAM.MSG.GET.{stream}"),
        format!("$JS.API.STREAM.MSG.DELETE.{stream}"),
        format!("$JS.API.STREAM.MSG.GET.{cancels}"),
        format!("$JS.API.STREAM.MSG.DELETE.{cancels}"),
        queue.dead_letter_subject(),
        queue.results_wildcard(),
        "_INBOX.>".to_owned(),
    ]);
    if rate_limited {
        let tokens = queue.tokens_stream();
        let consumer = queue.tokens_consumer();
        publish.extend([
            format!("$JS.API.STREAM.INFO.{tokens}"),
            format!("$JS.API.CONSUMER.INFO.{tokens}.{consumer}"),
            format!("$JS.API.CONSUMER.MSG.NEXT.{tokens}.{consumer}"),
            format!("$JS.ACK.{tokens}.>"),
        ]);
    }
    let mut subscribe = vec![format!("{inbox_prefix}.>")];
    if levels > 1 {
        subscribe.push(queue.jobs_wildcard());
        subscribe.push(queue.delayed_wildcard());
    }
    Permissions {
        publish_allow: publish,
        subscribe_allow: subscribe,
    }
}

/// What a producer of `queue` needs: publish its jobs (every level), delayed jobs and
/// cancellations, read its streams' info and stored messages (results, waiting for a job), and
/// receive replies under `inbox_prefix`.
pub fn producer(queue: &QueueRef, inbox_prefix: &str) -> Permissions {
    let mut publish = vec![
        queue.jobs_wildcard(),
        queue.delayed_wildcard(),
        queue.cancels_wildcard(),
    ];
    for stream in [
        queue.stream(),
        queue.delayed_stream(),
        queue.cancel_stream(),
        queue.results_stream(),
    ] {
        publish.push(format!("$JS.API.STREAM.INFO.{stream}"));
        publish.push(format!("$JS.API.STREAM.MSG.GET.{stream}"));
    }
    Permissions {
        publish_allow: publish,
        subscribe_allow: vec![format!("{inbox_prefix}.>")],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_gets_its_own_queue_and_inbox_only() {
        let queue = QueueRef::new("team", "mail");
        let p = worker(&queue, 1, false, "_INBOX_abc");
        let stream = queue.stream();
        for wanted in [
            format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.workers-p0"),
            format!("$JS.ACK.{stream}.>"),
            format!("$JS.API.STREAM.MSG.DELETE.{stream}"),
            format!("$JS.API.STREAM.MSG.GET.{}", queue.cancel_stream()),
            format!("$JS.API.STREAM.MSG.DELETE.{}", queue.cancel_stream()),
            queue.dead_letter_subject(),
            "_INBOX.>".to_owned(),
        ] {
            assert!(p.publish_allow.contains(&wanted), "{wanted} allowed");
        }
        assert_eq!(p.subscribe_allow, vec!["_INBOX_abc.>".to_owned()]);
        for refused in ["PURGE", "DELETE", "UPDATE"] {
            let subject = format!("$JS.API.STREAM.{refused}.");
            assert!(
                !p.publish_allow.iter().any(|s| s.starts_with(&subject)),
                "nothing under {subject}"
            );
        }
        assert!(
            !p.publish_allow
                .iter()
                .any(|s| s.contains("workers-p1") || s.contains("_tokens")),
            "one level, no tokens"
        );
        let other = QueueRef::new("team", "billing");
        assert!(
            !p.publish_allow.iter().any(|s| s.contains(&other.stream())),
            "nothing of another queue"
        );
        assert!(
            !p.publish_allow.contains(&queue.jobs_wildcard()),
            "a worker does not submit"
        );
    }

    #[test]
    fn levels_and_rate_limits_add_their_subjects() {
        let queue = QueueRef::new("team", "mail");
        let p = worker(&queue, 3, true, "_INBOX_abc");
        let stream = queue.stream();
        for level in 0..3 {
            let pull = format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.workers-p{level}");
            assert!(p.publish_allow.contains(&pull), "{pull}");
        }
        assert!(!p.publish_allow.iter().any(|s| s.contains("workers-p3")));
        let tokens = format!(
            "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
            queue.tokens_stream(),
            queue.tokens_consumer()
        );
        assert!(p.publish_allow.contains(&tokens));
        assert_eq!(
            p.subscribe_allow,
            vec![
                "_INBOX_abc.>".to_owned(),
                queue.jobs_wildcard(),
                queue.delayed_wildcard()
            ]
        );
        assert_eq!(
            worker(&queue, 0, false, "x").publish_allow,
            worker(&queue, 1, false, "x").publish_allow,
            "a queue has at least one level"
        );
    }

    #[test]
    fn a_producer_submits_and_reads_but_does_not_consume() {
        let queue = QueueRef::new("team", "mail");
        let p = producer(&queue, "_INBOX_p");
        assert!(p.publish_allow.contains(&queue.jobs_wildcard()));
        assert!(p.publish_allow.contains(&queue.cancels_wildcard()));
        assert!(
            !p.publish_allow
                .iter()
                .any(|s| s.starts_with("$JS.ACK") || s.contains("CONSUMER")),
            "no pulls, no acks"
        );
        assert_eq!(p.subscribe_allow, vec!["_INBOX_p.>".to_owned()]);
    }

    #[test]
    fn the_inbox_prefix_is_the_workers_uid() {
        assert_eq!(
            worker_inbox_prefix("0f5c-11aa"),
            "_INBOX_0f5c-11aa".to_owned()
        );
    }
}
