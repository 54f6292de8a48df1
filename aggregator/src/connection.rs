//! What a connection tells the requests it carries: the peer's address,
//! the certificate an agent presented, and why a body was cut. `server`
//! (which accepts connections) attaches them; the handlers in `http` and
//! `platform` read them. A module of its own, so that the handlers need not
//! name the server and the server need not name the handlers.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::revocation::AgentCertificate;

/// The certificate an agent's connection presented, attached to each of its
/// requests for the deny list, and whether the agents table already has it.
#[derive(Debug, Clone)]
pub(crate) struct PresentedCertificate {
    pub cert: Arc<AgentCertificate>,
    /// Set once a batch on this connection stored the certificate's details,
    /// so they are written once per connection, not once per batch.
    pub recorded: Arc<std::sync::atomic::AtomicBool>,
}

impl PresentedCertificate {
    pub(crate) fn new(cert: AgentCertificate) -> Self {
        PresentedCertificate {
            cert: Arc::new(cert),
            recorded: Arc::default(),
        }
    }
}

/// The TCP peer of a platform API connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerAddr(pub SocketAddr);

/// Why a request body was cut: it arrived slower than
/// `connections.min_body_rate`, or not within the whole-body deadline. The
/// batch handler answers 408 for it, so the agent resends the batch.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct SlowBody(pub(crate) &'static str);

impl SlowBody {
    /// Whether `error` (or anything it wraps) is a [`SlowBody`].
    pub(crate) fn is_cause_of(error: &(dyn std::error::Error + 'static)) -> bool {
        let mut cause = Some(error);
        while let Some(error) = cause {
            if error.is::<SlowBody>() {
                return true;
            }
            cause = error.source();
        }
        false
    }
}
