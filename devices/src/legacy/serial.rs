//! The 16550 UART (COM1 on x86_64, MMIO on aarch64): vm-superio's model on a bus, its output
//! to a writer (the monitor's stdout) and its input from a readable fd (the monitor's stdin),
//! the latter flow-controlled by the guest's reads.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, warn};
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::Serial;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::EventFdTrigger;
use crate::bus::BusDevice;
use crate::metrics::UART_METRICS;
use crate::sync::lock;

/// Signals the input side when the guest has drained the receive FIFO, so that reading from the
/// host resumes only when there is room (no busy loop on a full FIFO, no dropped input).
pub struct InputRoom(EventFd);

impl SerialEvents for InputRoom {
    fn buffer_read(&self) {
        UART_METRICS.read_count.inc();
    }
    fn out_byte(&self) {
        UART_METRICS.write_count.inc();
    }
    fn tx_lost_byte(&self) {
        UART_METRICS.missed_write_count.inc();
        debug!("serial: the host output failed; a guest byte was lost");
    }
    fn in_buffer_empty(&self) {
        if let Err(err) = self.0.write(1) {
            warn!("serial: cannot signal the input side: {err}");
        }
    }
}

/// The console's output, counting its flushes and failures for the `uart` metrics (vm-superio
/// writes and flushes each byte the guest transmits).
struct CountedOutput(Box<dyn Write + Send>);

impl Write for CountedOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .write(buf)
            .inspect_err(|_| UART_METRICS.error_count.inc())
    }

    fn flush(&mut self) -> io::Result<()> {
        UART_METRICS.flush_count.inc();
        self.0
            .flush()
            .inspect_err(|_| UART_METRICS.error_count.inc())
    }
}

fn counted(out: Box<dyn Write + Send>) -> Box<dyn Write + Send> {
    Box::new(CountedOutput(out))
}

/// The UART model shared between the vCPU threads (register accesses) and the event loop (input).
pub type SerialCore = Serial<EventFdTrigger, InputRoom, Box<dyn Write + Send>>;

/// The UART's registers and receive FIFO, for a snapshot (vm-superio's `SerialState`, which
/// is not serde-serializable, field for field).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialDeviceState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialDeviceState {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialDeviceState> for SerialState {
    fn from(s: &SerialDeviceState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// COM1 on the port-I/O bus.
pub struct SerialDevice {
    core: Arc<Mutex<SerialCore>>,
}

impl SerialDevice {
    /// `interrupt` raises the UART's IRQ line; `out` receives what the guest transmits.
    pub fn new(interrupt: EventFdTrigger, out: Box<dyn Write + Send>) -> io::Result<Self> {
        let room = InputRoom(EventFd::new(EFD_NONBLOCK)?);
        Ok(Self {
            core: Arc::new(Mutex::new(Serial::with_events(
                interrupt,
                room,
                counted(out),
            ))),
        })
    }

    /// A UART with the registers and FIFO of `state` (a restored snapshot).
    pub fn from_state(
        interrupt: EventFdTrigger,
        out: Box<dyn Write + Send>,
        state: &SerialDeviceState,
    ) -> io::Result<Self> {
        let room = InputRoom(EventFd::new(EFD_NONBLOCK)?);
        let core =
            Serial::from_state(&state.into(), interrupt, room, counted(out)).map_err(|err| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad serial state: {err:?}"),
                )
            })?;
        Ok(Self {
            core: Arc::new(Mutex::new(core)),
        })
    }

    /// The UART's state, for a snapshot.
    pub fn state(&self) -> SerialDeviceState {
        lock(&self.core).state().into()
    }

    /// The event-loop side that feeds `input` to the guest.
    pub fn input<R: Read + AsRawFd + Send>(&self, input: R) -> io::Result<SerialInput<R>> {
        let room = lock(&self.core).events().0.try_clone()?;
        Ok(SerialInput {
            core: self.core.clone(),
            input,
            room,
            waiting_for_room: false,
            closed: false,
        })
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            *byte = lock(&self.core).read(offset);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            if let Err(err) = lock(&self.core).write(offset, *byte) {
                debug!("serial: write to register {offset}: {err:?}");
            }
        }
    }
}

/// Reads host input into the UART's receive FIFO from the event loop.
pub struct SerialInput<R> {
    core: Arc<Mutex<SerialCore>>,
    input: R,
    room: EventFd,
    /// The FIFO was full: the input fd is out of the epoll set until the guest drains it.
    waiting_for_room: bool,
    /// The input reached its end or failed; it is never polled again.
    closed: bool,
}

impl<R: Read + AsRawFd + Send> SerialInput<R> {
    fn read_input(&mut self, ops: &mut EventOps) {
        let mut core = lock(&self.core);
        let capacity = core.fifo_capacity();
        if capacity == 0 {
            self.stop_polling_input(ops);
            self.waiting_for_room = true;
            return;
        }
        let mut buf = [0u8; 64];
        let want = capacity.min(buf.len());
        match self.input.read(&mut buf[..want]) {
            Ok(0) => {
                debug!("serial: input closed");
                self.stop_polling_input(ops);
                self.closed = true;
            }
            Ok(n) => {
                if let Err(err) = core.enqueue_raw_bytes(&buf[..n]) {
                    UART_METRICS.missed_read_count.add(n as u64);
                    warn!("serial: cannot pass input to the guest: {err:?}");
                }
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => {
                warn!("serial: reading input failed, input disabled: {err}");
                self.stop_polling_input(ops);
                self.closed = true;
            }
        }
    }

    fn stop_polling_input(&self, ops: &mut EventOps) {
        if let Err(err) = ops.remove(Events::new(&self.input, EventSet::IN)) {
            debug!("serial: cannot stop polling the input: {err}");
        }
    }
}

impl<R: Read + AsRawFd + Send> MutEventSubscriber for SerialInput<R> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.room.as_raw_fd() {
            let _ = self.room.read();
            if self.waiting_for_room && !self.closed {
                self.waiting_for_room = false;
                if let Err(err) = ops.add(Events::new(&self.input, EventSet::IN)) {
                    warn!("serial: cannot resume polling the input: {err}");
                }
            }
        } else if events.event_set().contains(EventSet::IN) {
            self.read_input(ops);
        } else {
            // Hang-up or error without data: the input is gone.
            self.stop_polling_input(ops);
            self.closed = true;
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(err) = ops.add(Events::new(&self.room, EventSet::IN)) {
            warn!("serial: cannot poll the input-room event: {err}");
        }
        // Regular files and /dev/null cannot be polled (EPERM): the guest then gets no input.
        if let Err(err) = ops.add(Events::new(&self.input, EventSet::IN)) {
            debug!("serial: input cannot be polled, the guest gets no input: {err}");
            self.closed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use event_manager::{EventManager, SubscriberOps};

    use super::*;

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    const THR: u64 = 0;
    const LSR: u64 = 5;
    const LSR_DATA_READY: u8 = 1;

    fn serial() -> (SerialDevice, Captured, EventFd) {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let out = Captured::default();
        let dev = SerialDevice::new(
            EventFdTrigger::new(irq.try_clone().unwrap()),
            Box::new(out.clone()),
        )
        .unwrap();
        (dev, out, irq)
    }

    #[test]
    fn guest_output_reaches_the_writer() {
        let (mut dev, out, _irq) = serial();
        for byte in b"hi\n" {
            dev.write(0x3f8, THR, &[*byte]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
    }

    #[test]
    fn input_waits_for_room_and_loses_nothing() {
        let (mut dev, _out, _irq) = serial();
        let (host, guest_side) = UnixStream::pair().unwrap();
        guest_side.set_nonblocking(true).unwrap();
        let input = Arc::new(Mutex::new(dev.input(guest_side).unwrap()));
        let mut manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        manager.add_subscriber(input);

        // More than the 64-byte FIFO holds.
        let sent: Vec<u8> = (0..200u32).map(|i| b'a' + (i % 26) as u8).collect();
        (&host).write_all(&sent).unwrap();

        let mut received = Vec::new();
        while received.len() < sent.len() {
            manager.run_with_timeout(100).unwrap();
            let mut status = [0u8];
            loop {
                dev.read(0x3f8, LSR, &mut status);
                if status[0] & LSR_DATA_READY == 0 {
                    break;
                }
                let mut byte = [0u8];
                dev.read(0x3f8, THR, &mut byte);
                received.push(byte[0]);
            }
        }
        assert_eq!(received, sent);
    }
}
