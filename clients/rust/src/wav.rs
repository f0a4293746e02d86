//! A minimal streaming WAV (RIFF) writer: the canonical 44-byte header,
//! PCM 16-bit (format tag 1) or IEEE float 32-bit (format tag 3).

use std::io::{self, Seek, SeekFrom, Write};

use crate::event::{AudioSpec, SampleFormat};

/// Size of the header [`header`] writes.
pub const HEADER_BYTES: usize = 44;

const PCM: u16 = 1;
const IEEE_FLOAT: u16 = 3;

/// The 44-byte header of a WAV file holding `data_bytes` bytes of samples.
pub fn header(spec: AudioSpec, data_bytes: u32) -> [u8; HEADER_BYTES] {
    let width = spec.format.sample_width() as u16;
    let block_align = width.saturating_mul(spec.channels);
    let byte_rate = spec.sample_rate.saturating_mul(u32::from(block_align));
    let tag = match spec.format {
        SampleFormat::S16le => PCM,
        SampleFormat::F32le => IEEE_FLOAT,
    };
    let mut h = [0u8; HEADER_BYTES];
    h[0..4].copy_from_slice(b"RIFF");
    h[4..8].copy_from_slice(&data_bytes.saturating_add(36).to_le_bytes());
    h[8..12].copy_from_slice(b"WAVE");
    h[12..16].copy_from_slice(b"fmt ");
    h[16..20].copy_from_slice(&16u32.to_le_bytes());
    h[20..22].copy_from_slice(&tag.to_le_bytes());
    h[22..24].copy_from_slice(&spec.channels.to_le_bytes());
    h[24..28].copy_from_slice(&spec.sample_rate.to_le_bytes());
    h[28..32].copy_from_slice(&byte_rate.to_le_bytes());
    h[32..34].copy_from_slice(&block_align.to_le_bytes());
    h[34..36].copy_from_slice(&(width * 8).to_le_bytes());
    h[36..40].copy_from_slice(b"data");
    h[40..44].copy_from_slice(&data_bytes.to_le_bytes());
    h
}

/// Writes PCM as it arrives and fixes the header's sizes in [`WavWriter::finish`].
#[derive(Debug)]
pub struct WavWriter<W: Write + Seek> {
    out: W,
    spec: AudioSpec,
    data_bytes: u64,
}

impl<W: Write + Seek> WavWriter<W> {
    /// Write a provisional header (sizes 0) at the current position.
    pub fn new(mut out: W, spec: AudioSpec) -> io::Result<WavWriter<W>> {
        out.write_all(&header(spec, 0))?;
        Ok(WavWriter {
            out,
            spec,
            data_bytes: 0,
        })
    }

    /// Append little-endian samples in the writer's format.
    pub fn write_pcm(&mut self, pcm: &[u8]) -> io::Result<()> {
        let total = self.data_bytes + pcm.len() as u64;
        // RIFF sizes are 32-bit; the RIFF size field also counts 36 header bytes.
        if total > u64::from(u32::MAX - 36) {
            return Err(io::Error::new(io::ErrorKind::Other, "WAV data would exceed 4 GiB"));
        }
        self.out.write_all(pcm)?;
        self.data_bytes = total;
        Ok(())
    }

    /// Bytes of samples written so far.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Rewrite the header with the final sizes, flush, and return the writer.
    pub fn finish(mut self) -> io::Result<W> {
        let end = self.out.stream_position()?;
        let start = end - self.data_bytes - HEADER_BYTES as u64;
        self.out.seek(SeekFrom::Start(start))?;
        // write_pcm keeps data_bytes within u32.
        self.out.write_all(&header(self.spec, self.data_bytes as u32))?;
        self.out.seek(SeekFrom::Start(end))?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn s16_header_is_canonical() {
        let spec = AudioSpec {
            sample_rate: 22050,
            channels: 1,
            format: SampleFormat::S16le,
        };
        let h = header(spec, 1000);
        let mut want = Vec::new();
        want.extend_from_slice(b"RIFF");
        want.extend_from_slice(&1036u32.to_le_bytes());
        want.extend_from_slice(b"WAVEfmt ");
        want.extend_from_slice(&[16, 0, 0, 0, 1, 0, 1, 0]);
        want.extend_from_slice(&22050u32.to_le_bytes());
        want.extend_from_slice(&44100u32.to_le_bytes());
        want.extend_from_slice(&[2, 0, 16, 0]);
        want.extend_from_slice(b"data");
        want.extend_from_slice(&1000u32.to_le_bytes());
        assert_eq!(h.to_vec(), want);
    }

    #[test]
    fn f32_header_uses_ieee_float() {
        let spec = AudioSpec {
            sample_rate: 16000,
            channels: 1,
            format: SampleFormat::F32le,
        };
        let h = header(spec, 64);
        assert_eq!(&h[20..22], &[3, 0]);
        assert_eq!(u32::from_le_bytes([h[28], h[29], h[30], h[31]]), 64000);
        assert_eq!(&h[32..36], &[4, 0, 32, 0]);
    }

    #[test]
    fn writer_patches_sizes() {
        let spec = AudioSpec {
            sample_rate: 8000,
            channels: 1,
            format: SampleFormat::S16le,
        };
        let mut w = WavWriter::new(Cursor::new(Vec::new()), spec).unwrap();
        w.write_pcm(&[1, 0, 2, 0]).unwrap();
        w.write_pcm(&[3, 0]).unwrap();
        assert_eq!(w.data_bytes(), 6);
        let bytes = w.finish().unwrap().into_inner();
        assert_eq!(bytes.len(), 50);
        assert_eq!(&bytes[..44], &header(spec, 6));
        assert_eq!(&bytes[44..], &[1, 0, 2, 0, 3, 0]);
    }
}
