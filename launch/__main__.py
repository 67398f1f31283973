from launch.cli import main_entry

main_entry()
