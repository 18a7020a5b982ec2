//! The exact length of a rewritten error's envelope, when it is known before the answer's head
//! is written.
//!
//! An upstream error whose body decides the envelope is planned with chunked framing: the plan
//! is made from the head, before any body byte. Pingora flushes a chunked head, each chunk and
//! the last chunk: three writes, each waking the client, where a known length takes one. But
//! Pingora runs every filter over one batch of upstream events before it writes any of them,
//! and a small answer's head and body nearly always come in one batch (one read): by the time
//! the head is written, the envelope is known. [`Framing`], a downstream module and so the last
//! filter a head passes before the write, then gives the head the envelope's `Content-Length` in
//! place of chunked framing. A body that comes later goes out chunked, as planned.

use std::any::Any;

use async_trait::async_trait;
use http::header;
use pingora::http::ResponseHeader;
use pingora::modules::http::{HttpModule, HttpModuleBuilder, Module};
use pingora::proxy::Session;
use pingora::Result;

/// The per-request module: the envelope's length, once the body filter knows it.
#[derive(Debug, Default)]
pub struct Framing {
    length: Option<usize>,
}

impl Framing {
    /// Records that the whole answer is `length` bytes, when the head is still unwritten (the
    /// head and the envelope are in one batch); otherwise the chunked framing stands.
    pub fn known(session: &mut Session, length: usize) {
        if session.response_written().is_some() {
            return;
        }
        if let Some(framing) = session.downstream_modules_ctx.get_mut::<Framing>() {
            framing.length = Some(length);
        }
    }
}

#[async_trait]
impl HttpModule for Framing {
    async fn response_header_filter(
        &mut self,
        resp: &mut ResponseHeader,
        _end_of_stream: bool,
    ) -> Result<()> {
        if let Some(length) = self.length.take() {
            resp.remove_header(&header::TRANSFER_ENCODING);
            resp.insert_header(header::CONTENT_LENGTH, length)?;
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// Builds a [`Framing`] for each request.
pub struct FramingBuilder;

impl HttpModuleBuilder for FramingBuilder {
    fn init(&self) -> Module {
        Box::new(Framing::default())
    }
}
